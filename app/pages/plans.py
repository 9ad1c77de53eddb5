"""Plan explorer: a policy and a budget make a Plan from the profile (predicted cost shown at once);
"Evaluate" applies it for real in a background job and adds the measured point to the quality vs
compression vs speed chart (Pareto front over everything evaluated in this session); "Export"
downloads the Plan as JSON."""
from __future__ import annotations

import json

import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html, no_update

from lensbench.policies import POLICIES, make_plan

from ..components import graph, notice, opened_or_notice, profile_picker, progress_bar

PATH, TITLE = "/plans", "Plan explorer"
PROFILE_ONLY = [n for n, p in POLICIES.items() if not p.needs_model]


def layout(state):
    return html.Div([
        html.H2("Plan explorer"),
        html.Label(["Profile ", profile_picker(state, "pl-profile")]),
        html.Div([dcc.Dropdown(id="pl-policy", options=PROFILE_ONLY, value="drop-block", clearable=False,
                               className="picker"),
                  dcc.Input(id="pl-budget", type="number", value=4, min=0, step=0.5),
                  html.Button("Make plan", id="pl-make", n_clicks=0),
                  html.Button("Evaluate", id="pl-eval", n_clicks=0),
                  html.Button("Export plan", id="pl-export", n_clicks=0)], className="row"),
        html.Div(id="pl-budget-help"),
        html.Div(id="pl-plan"),
        dcc.Store(id="pl-job"), dcc.Download(id="pl-download"),
        dcc.Interval(id="pl-poll", interval=500, disabled=True),
        html.Div(id="pl-status"),
        html.Div(id="pl-front"),
    ])


def _plan(state, key, policy, budget):
    profile, note = opened_or_notice(state, key)
    if profile is None:
        return None, note
    if policy not in PROFILE_ONLY or budget is None:
        return None, notice("Choose a policy and a budget.", "warn")
    return make_plan(policy, profile, float(budget)), None


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
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="evaluated plans",
                                 marker={"size": 12, "color": [p["decode_speedup"] for p in points],
                                         "colorscale": "Viridis", "colorbar": {"title": "decode speed-up ×"},
                                         "showscale": True},
                                 text=[p["label"] for p in points],
                                 hovertemplate="%{text}<br>weights %{x:.3f} of dense<br>KL %{y:.4f} nats"
                                               "<extra></extra>"))
        fig.add_trace(go.Scatter(x=[p["weight_fraction"] for p in front], y=[p["kl"] for p in front],
                                 mode="lines", name="Pareto front", line={"dash": "dot"}))
    fig.update_layout(title="Measured quality vs compression (colour: decode speed-up vs dense)",
                      xaxis_title="weight bytes, fraction of dense", yaxis_title="held-out KL to dense (nats)",
                      height=420)
    return fig


def register(app, state):
    @app.callback(Output("pl-budget-help", "children"), Input("pl-policy", "value"))
    def budget_help(policy):
        return html.Small(f"budget: {POLICIES[policy].budget}" if policy in POLICIES else "")

    @app.callback(Output("pl-plan", "children"), Input("pl-make", "n_clicks"), State("pl-profile", "value"),
                  State("pl-policy", "value"), State("pl-budget", "value"), prevent_initial_call=True)
    def make(_, key, policy, budget):
        try:
            plan, note = _plan(state, key, policy, budget)
        except Exception as exc:  # a budget the policy refuses: its one-line message
            return notice(str(exc), "error")
        if plan is None:
            return note
        units = ", ".join(str(u) for u in plan.units()) or "nothing"
        pred = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in (plan.predicted or {}).items() if k != "rounds")
        return html.Div([html.P(f"{plan!r}"), html.P(f"removes: {units}"),
                         html.P(f"predicted: {pred or '—'}")], id="pl-plan-box")

    @app.callback(Output("pl-download", "data"), Input("pl-export", "n_clicks"), State("pl-profile", "value"),
                  State("pl-policy", "value"), State("pl-budget", "value"), prevent_initial_call=True)
    def export(_, key, policy, budget):
        try:
            plan, _ = _plan(state, key, policy, budget)
        except Exception:
            return no_update
        if plan is None:
            return no_update
        return {"content": json.dumps(plan.to_dict(), indent=1), "filename": f"{policy}-{budget}.plan.json"}

    @app.callback(Output("pl-job", "data"), Output("pl-poll", "disabled"), Output("pl-status", "children"),
                  Input("pl-eval", "n_clicks"), State("pl-profile", "value"), State("pl-policy", "value"),
                  State("pl-budget", "value"), prevent_initial_call=True)
    def evaluate_start(_, key, policy, budget):
        try:
            plan, note = _plan(state, key, policy, budget)
        except Exception as exc:
            return None, True, notice(str(exc), "error")
        if plan is None:
            return None, True, note
        profile = state.get(key).profile

        def job(progress):
            from lensbench.evaluate import EvalConfig, evaluate
            from lensbench.texts import bbc_news

            progress(0.05, "loading the model")
            model = state.model_for(profile)
            progress(0.2, "applying the plan and measuring quality and speed")
            cfg = EvalConfig(texts=8, seq_len=64, cities=20, speed_rounds=2, prompt_tokens=32, decode_tokens=8)
            result = evaluate(model, plan, cfg, texts=bbc_news("heldout", limit=8))
            return {"label": f"{policy} {budget}", "kl": result["kl_to_dense"],
                    "weight_fraction": result["weight_bytes"] / result["dense_weight_bytes"],
                    "decode_speedup": result["decode_speed_ratio"]}

        return state.submit("evaluate", job), False, progress_bar("pl-progress")

    @app.callback(Output("pl-front", "children"), Output("pl-poll", "disabled", allow_duplicate=True),
                  Output("pl-status", "children", allow_duplicate=True), Input("pl-poll", "n_intervals"),
                  State("pl-job", "data"), prevent_initial_call=True)
    def evaluate_poll(_, job_id):
        job = state.jobs.get(job_id or "")
        if job is None:
            return no_update, True, no_update
        if not job.done:
            return no_update, False, progress_bar("pl-progress", job)
        if job.error:
            return no_update, True, notice(job.error, "error")
        state.evaluations.append(job.result)
        r = job.result
        return graph(front_figure(state.evaluations), "pl-front-fig"), True, \
            notice(f"{r['label']}: KL {r['kl']:.4f} nats, weights {r['weight_fraction']:.3f} of dense, decode "
                   f"×{r['decode_speedup']:.2f}", "info")
