"""Small shared pieces of page layouts."""
from __future__ import annotations

from dash import dcc, html, no_update

GRAPH_CONFIG = {"displaylogo": False, "responsive": True}


def notice(text: str, kind: str = "info") -> html.Div:
    """A plain message box (kind: info | warn | error)."""
    return html.Div(text, className=f"notice notice-{kind}", role="status")


def missing(what: str, command: str) -> html.Div:
    return notice(f"This profile has no {what} yet. Run `{command}` and open the profile again.", "warn")


def graph(fig, id_: str | dict | None = None, **kw) -> dcc.Graph:
    args = {"figure": fig, "config": GRAPH_CONFIG, **kw}
    if id_ is not None:
        args["id"] = id_
    return dcc.Graph(**args)


def profile_picker(state, id_: str, value=None) -> dcc.Dropdown:
    return dcc.Dropdown(id=id_, options=state.options(), value=value or state.first_key(), clearable=False,
                        className="picker")


def opened_or_notice(state, key):
    """(profile, None) or (None, a notice explaining why there is nothing to show)."""
    o = state.get(key)
    if o is None:
        return None, notice("No profile is open. Start the app with `lensbench app PROFILE_DIR`.", "warn")
    if o.profile is None:
        return None, notice(f"{o.path} cannot be opened: {o.error}", "error")
    return o.profile, None


def progress_bar(id_: str, job=None) -> html.Div:
    """A background job's progress bar and message (a fresh bar when `job` is None)."""
    if job is None:
        return html.Div(html.Progress(id=id_, value="0", max="1"))
    return html.Div([html.Progress(id=id_, value=str(job.fraction), max="1"), html.Span(f" {job.message}")])


def polled(state, job_id, bar_id: str):
    """One poll of a background job: (the job once it is done, else None; stop polling?; the status to
    show meanwhile: its progress bar, or no_update for an unknown job)."""
    job = state.jobs.get(job_id or "")
    if job is None:
        return None, True, no_update
    if not job.done:
        return None, False, progress_bar(bar_id, job)
    return job, True, None
