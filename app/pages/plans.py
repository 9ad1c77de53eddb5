"""Plan explorer: a policy and a budget make a Plan from the profile, shown at once with the
policy's predicted quality vs compression vs speed over a ladder of budgets (from the profile's
single-unit ablation KLs); "Evaluate" applies it for real in a background job and adds the measured
point to the measured chart (Pareto front over everything evaluated in this session); "Export"
downloads the Plan as JSON; "Save model" writes the planned model as a checkpoint in the chosen format
(`lensbench compress`) into `saved/` beside the profile, in a background job."""
from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html, no_update

from lensbench.errors import LensbenchError
from lensbench.compress.policies import POLICIES, make_plan

from ..components import graph, notice, opened_or_notice, polled, profile_picker, progress_bar
from lensbench.compress.evaluate import EvalConfig, evaluate
from lensbench.texts import bbc_news
from lensbench.compress.save import compress

PATH, TITLE = "/plans", "Plan explorer"
PROFILE_ONLY = [n for n, p in POLICIES.items() if p.profile_only]
INLINE = {"display": "inline-block", "verticalAlign": "bottom", "marginRight": "12px"}
LADDER = 12  # budgets drawn on the predicted chart
SAVE_FORMATS = ["hf", "gguf", "compressed-tensors"]
LOADERS = {"hf": "transformers (AutoModelForCausalLM.from_pretrained), lensbench.load",
           "gguf": "llama.cpp, transformers (from_pretrained(DIR, gguf_file=...)), lensbench.load",
           "compressed-tensors": "vLLM, transformers with compressed-tensors, lensbench.load"}


def layout(state):
    return html.Div([
        html.H2("Plan explorer"),
        html.Label(["Profile ", profile_picker(state, "pl-profile")]),
        html.Div([html.Label(["Policy ", dcc.Dropdown(id="pl-policy", options=PROFILE_ONLY, value="drop-block",
                                                       clearable=False)], style=INLINE | {"width": "260px"}),
                  html.Label(["Budget ", dcc.Input(id="pl-budget", type="number", value=4, min=0, step=0.5,
                                                   style={"width": "90px"})], style=INLINE),
                  html.Button("Make plan", id="pl-make", n_clicks=0),
                  html.Button("Evaluate", id="pl-eval", n_clicks=0),
                  html.Button("Export plan", id="pl-export", n_clicks=0),
                  html.Label(["Format ", dcc.Dropdown(id="pl-format", options=SAVE_FORMATS, value="hf",
                                                      clearable=False)], style=INLINE | {"width": "200px"}),
                  html.Button("Save model", id="pl-save", n_clicks=0)], className="row"),
        html.Div(id="pl-budget-help"),
        html.Div(id="pl-plan"),
        dcc.Store(id="pl-job"), dcc.Download(id="pl-download"),
        dcc.Interval(id="pl-poll", interval=500, disabled=True),
        html.Div(id="pl-status"),
        dcc.Store(id="pl-save-job"), dcc.Interval(id="pl-save-poll", interval=500, disabled=True),
        html.Div(id="pl-save-status"),
        html.Div(id="pl-front"),
    ])


def _plan(state, key, policy, budget):
    """(the Plan, None) or (None, a notice saying why there is none: no profile, no choice, or the
    policy's one-line refusal of the budget)."""
    profile, note = opened_or_notice(state, key)
    if profile is None:
        return None, note
    if policy not in PROFILE_ONLY or budget is None:
        return None, notice("Choose a policy and a budget.", "warn")
    try:
        return make_plan(policy, profile, float(budget)), None
    except Exception as exc:  # a budget the policy refuses: its one-line message
        return None, notice(str(exc), "error")


def predicted_kl(profile, plan) -> float | None:
    """Additive estimate: the sum of each removed unit's single-unit ablation KL (None without them)."""
    total = 0.0
    for u in plan.units():
        s = profile.scores.get(f"ablation_kl_{u.kind}")
        if s is None:
            return None
        total += float(s.values[u.layer])
    return total


def ladder(policy: str, L: int) -> list[float]:
    if policy.startswith("drop-"):
        return list(range(1, min(LADDER, L - 1) + 1))
    if policy.endswith("-skip"):
        return [L / keep for keep in range(L - 1, max(L - 1 - LADDER, 1), -1)]
    return []


def predicted_figure(profile, policy: str) -> go.Figure | None:
    """The policy's plans over a ladder of budgets: layer compute removed vs predicted KL, coloured by
    the layer-count speed-up estimate. None for policies this does not cover or without ablation KLs."""
    L = int(profile.model["n_layers"])
    pts = []
    for b in ladder(policy, L):
        try:
            plan = make_plan(policy, profile, b)
        except LensbenchError:
            continue
        kl = predicted_kl(profile, plan)
        if kl is None:
            return None
        frac = plan.summary()["layer_fraction_removed"]
        pts.append((frac, kl, 1 / (1 - frac), f"budget {b:.3g}: " + ", ".join(map(str, plan.units()))))
    if not pts:
        return None
    fig = go.Figure(go.Scatter(
        x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=f"{policy}, budgets",
        text=[p[3] for p in pts], customdata=[p[2] for p in pts],
        marker={"size": 9, "color": [p[2] for p in pts], "colorscale": "Viridis", "showscale": True,
                "colorbar": {"title": "predicted speed-up ×<br>(layer count)"}},
        hovertemplate="%{text}<br>layer compute removed %{x:.3f}<br>predicted KL %{y:.3f} nats<br>"
                      "speed-up ×%{customdata:.2f} (layer count)<extra></extra>"))
    fig.update_layout(title=f"Predicted by the profile: {policy} over budgets (KL = sum of single-unit ablation "
                            f"KLs, an additive estimate)", xaxis_title="layer compute removed (attention or MLP "
                            "= half a layer), fraction of the layers", yaxis_title="predicted KL to dense (nats)",
                      yaxis_type="log", height=400, legend={"orientation": "h", "y": -0.3})
    return fig


def _with_current(fig: go.Figure, plan, kl: float | None) -> go.Figure:
    """A copy of the (memoised) ladder figure with the current plan marked."""
    fig = go.Figure(fig)
    if kl is not None:
        fig.add_trace(go.Scatter(x=[plan.summary()["layer_fraction_removed"]], y=[kl], mode="markers",
                                 name="this plan", marker={"symbol": "star", "size": 16, "color": "#d62728"},
                                 hovertemplate="this plan: predicted KL %{y:.3f} nats<extra></extra>"))
    return fig


def front_point(label: str, result: dict, **extra) -> dict:
    """A point of the quality-vs-compression chart from a `lensbench evaluate` record."""
    return {"label": label, "kl": result["kl_to_dense"], "weight_fraction": result["weight_bytes"] /
            result["dense_weight_bytes"], "decode_speedup": result.get("decode_speed_ratio", float("nan")), **extra}


def front_figure(points: list[dict]) -> go.Figure:
    fig = go.Figure()
    if points:
        xs = [p["weight_fraction"] for p in points]
        ys = [p["kl"] for p in points]
        best, front = float("inf"), []
        for p in sorted(points, key=lambda p: p["weight_fraction"]):
            if p["kl"] < best:
                best = p["kl"]
                front.append(p)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", name="evaluated plans", textposition="top center",
                                 marker={"size": 12, "color": [p["decode_speedup"] for p in points],
                                         "colorscale": "Viridis", "colorbar": {"title": "decode speed-up ×"},
                                         "showscale": True},
                                 text=[p["label"] for p in points],
                                 hovertemplate="%{text}<br>weights %{x:.3f} of dense<br>KL %{y:.4f} nats"
                                               "<extra></extra>"))
        fig.add_trace(go.Scatter(x=[p["weight_fraction"] for p in front], y=[p["kl"] for p in front],
                                 mode="lines", name="Pareto front", line={"dash": "dot"}))
    fig.update_layout(title="Measured in this session: quality vs compression (colour: decode speed-up vs dense)",
                      xaxis_title="weight bytes, fraction of dense", yaxis_title="held-out KL to dense (nats)",
                      height=420, legend={"orientation": "h", "y": -0.25})
    return fig


def register(app, state):
    @app.callback(Output("pl-budget-help", "children"), Input("pl-policy", "value"))
    def budget_help(policy):
        return html.Small(f"budget: {POLICIES[policy].budget}" if policy in POLICIES else "")

    @app.callback(Output("pl-plan", "children"), Input("pl-make", "n_clicks"), State("pl-profile", "value"),
                  State("pl-policy", "value"), State("pl-budget", "value"), prevent_initial_call=True)
    def make(_, key, policy, budget):
        plan, note = _plan(state, key, policy, budget)
        if plan is None:
            return note
        profile = state.get(key).profile
        units = ", ".join(str(u) for u in plan.units()) or "nothing"
        kl = predicted_kl(profile, plan)
        estimate = f"predicted KL to dense {kl:.3f} nats (sum of single-unit ablation KLs)" if kl is not None else \
            "no predicted KL (the profile has no ablation scores for these units)"
        fig = state.memo(("predicted", key, policy), lambda: predicted_figure(profile, policy))
        return html.Div([html.P(f"{plan!r}"), html.P(f"removes: {units}"), html.P(estimate),
                         graph(_with_current(fig, plan, kl), "pl-predicted-fig") if fig is not None else
                         notice("The predicted chart covers drop and skip policies; evaluate bit plans to measure "
                                "them.")], id="pl-plan-box")

    @app.callback(Output("pl-download", "data"), Input("pl-export", "n_clicks"), State("pl-profile", "value"),
                  State("pl-policy", "value"), State("pl-budget", "value"), prevent_initial_call=True)
    def export(_, key, policy, budget):
        plan, _ = _plan(state, key, policy, budget)
        if plan is None:
            return no_update
        return {"content": json.dumps(plan.to_dict(), indent=1), "filename": f"{policy}-{budget}.plan.json"}

    @app.callback(Output("pl-job", "data"), Output("pl-poll", "disabled"), Output("pl-status", "children"),
                  Input("pl-eval", "n_clicks"), State("pl-profile", "value"), State("pl-policy", "value"),
                  State("pl-budget", "value"), prevent_initial_call=True)
    def evaluate_start(_, key, policy, budget):
        plan, note = _plan(state, key, policy, budget)
        if plan is None:
            return None, True, note
        profile = state.get(key).profile
        predicted = predicted_kl(profile, plan)

        def job(progress):

            progress(0.05, "loading the model")
            model = state.model_for(profile)
            progress(0.2, "applying the plan and measuring quality and speed")
            cfg = EvalConfig(texts=8, seq_len=64, cities=20, topics=10, speed_rounds=2, prompt_tokens=32,
                             decode_tokens=8)
            result = evaluate(model, plan, cfg, texts=bbc_news("heldout", limit=8))
            return front_point(f"{policy} {budget}", result, predicted_kl=predicted)

        return state.submit("evaluate", job), False, progress_bar("pl-progress")

    @app.callback(Output("pl-front", "children"), Output("pl-poll", "disabled", allow_duplicate=True),
                  Output("pl-status", "children", allow_duplicate=True), Input("pl-poll", "n_intervals"),
                  State("pl-job", "data"), prevent_initial_call=True)
    def evaluate_poll(_, job_id):
        job, stop, status = polled(state, job_id, "pl-progress")
        if job is None:
            return no_update, stop, status
        if job.error:
            return no_update, True, notice(job.error, "error")
        state.evaluations.append(job.result)
        r = job.result
        return graph(front_figure(state.evaluations), "pl-front-fig"), True, \
            notice(f"{r['label']}: KL {r['kl']:.4f} nats" + (
                f" (predicted {r['predicted_kl']:.4f})" if r["predicted_kl"] is not None else "")
                + f", weights {r['weight_fraction']:.3f} of dense, decode ×{r['decode_speedup']:.2f}", "info")

    @app.callback(Output("pl-save-job", "data"), Output("pl-save-poll", "disabled"),
                  Output("pl-save-status", "children"), Input("pl-save", "n_clicks"), State("pl-profile", "value"),
                  State("pl-policy", "value"), State("pl-budget", "value"), State("pl-format", "value"),
                  prevent_initial_call=True)
    def save_start(_, key, policy, budget, fmt):
        plan, note = _plan(state, key, policy, budget)
        if plan is None:
            return None, True, note
        opened = state.get(key)
        out = saved_dir(opened.path, f"{policy}-{budget}-{fmt}")

        def job(progress):

            progress(0.05, "loading the model")
            model = state.model_for(opened.profile)
            progress(0.3, f"writing {fmt} to {out}")
            saved = compress(model, plan, format=fmt, out=out, overwrite=True)
            r = saved.record
            return {"path": str(saved.path), "MB": r["files_bytes"] / 1e6, "bits": r["bits_per_weight"],
                    "note": r.get("note", ""), "loaders": LOADERS[fmt] if r.get("layout") != "lensbench"
                    else "lensbench.load (lensbench's own layout)"}

        return state.submit("compress", job), False, progress_bar("pl-save-progress")

    @app.callback(Output("pl-save-status", "children", allow_duplicate=True),
                  Output("pl-save-poll", "disabled", allow_duplicate=True), Input("pl-save-poll", "n_intervals"),
                  State("pl-save-job", "data"), prevent_initial_call=True)
    def save_poll(_, job_id):
        job, stop, status = polled(state, job_id, "pl-save-progress")
        if job is None:
            return status, stop
        if job.error:
            return notice(job.error, "error"), True
        r = job.result
        return html.Div([notice(f"saved {r['path']}: {r['MB']:.1f} MB, {r['bits']:.2f} bits per weight; loads in "
                                f"{r['loaders']}", "info")] + ([html.Small(r["note"])] if r["note"] else []),
                        id="pl-saved"), True


def saved_dir(profile_path: str, name: str) -> Path:
    """Where the app saves a model: `saved/NAME` beside the profile file."""
    base = Path(profile_path)
    return (base if base.is_dir() else base.parent) / "saved" / name
