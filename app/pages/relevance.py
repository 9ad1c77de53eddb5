"""Relevance: type a prompt, DynamicLRP runs in a background job; the token heatmap and the layer ×
token map appear when it is done."""
from __future__ import annotations

from dash import Input, Output, State, dcc, html, no_update

from ..components import graph, notice, opened_or_notice, polled, profile_picker, progress_bar
from lensbench.analyses.lrp.attribute import attribute
from lensbench.errors import LensbenchError

PATH, TITLE = "/relevance", "Relevance"


def layout(state):
    return html.Div([
        html.H2("Relevance (DynamicLRP)"),
        html.Label(["Profile ", profile_picker(state, "rl-profile")]),
        html.Div([dcc.Input(id="rl-text", type="text", value="The city of Lyon is in the country of", debounce=False,
                            style={"width": "60%"}, placeholder="prompt"),
                  dcc.Input(id="rl-target", type="text", value="", placeholder="target token (default: prediction)",
                            style={"width": "22%"}),
                  html.Button("Explain", id="rl-run", n_clicks=0)], className="row"),
        dcc.Store(id="rl-job"),
        dcc.Interval(id="rl-poll", interval=400, disabled=True),
        html.Div(id="rl-status"),
        html.Div(id="rl-result"),
    ])


def register(app, state):
    @app.callback(Output("rl-job", "data"), Output("rl-poll", "disabled"), Output("rl-status", "children"),
                  Input("rl-run", "n_clicks"), State("rl-profile", "value"), State("rl-text", "value"),
                  State("rl-target", "value"), prevent_initial_call=True)
    def start(_, key, text, target):
        profile, note = opened_or_notice(state, key)
        if profile is None:
            return None, True, note
        if not (text or "").strip():
            return None, True, notice("Type a prompt first.", "warn")

        def job(progress):

            progress(0.1, "loading the model")
            model = state.model_for(profile)
            if not model.is_causal_lm:
                raise LensbenchError(f"{model.name} has no language-model head: relevance here explains next-token "
                                     f"predictions of causal LMs")
            progress(0.4, "forward pass and relevance walk")
            return attribute(model, text, target=target or None)

        return state.submit("relevance", job), False, progress_bar("rl-progress")

    @app.callback(Output("rl-result", "children"), Output("rl-poll", "disabled", allow_duplicate=True),
                  Output("rl-status", "children", allow_duplicate=True), Input("rl-poll", "n_intervals"),
                  State("rl-job", "data"), prevent_initial_call=True)
    def poll(_, job_id):
        job, stop, status = polled(state, job_id, "rl-progress")
        if job is None:
            return no_update, stop, status
        if job.error:
            return notice(job.error, "error"), True, None
        rel = job.result
        c = rel.conservation
        summary = notice(f"{rel.target!r}: start {rel.start:.3f}; {c['nodes']} autograd nodes, coverage "
                         f"{c['coverage']:.2%}, end-to-end conservation error {c['end_to_end_error']:.1e}")
        return html.Div([summary, graph(rel.plot("tokens"), "rl-tokens"), graph(rel.plot("layers"), "rl-layers")]), \
            True, None
