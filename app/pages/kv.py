"""KV cache: the profile's `kv_sensitivity` grid (layers x (K bits, V bits) pairs, end-to-end KL or the layer's
attention-output error, log colour scale), the keys-vs-values check, and KVTuner's search (`kv-tuner`) run in a
background job at a chosen budget, drawn as its Pareto front of equivalent bits against calibration KL with
the uniform pairs and the chosen plan marked."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html, no_update

from lensbench.compress.policies import make_plan

from ..components import graph, missing, notice, opened_or_notice, polled, profile_picker, progress_bar

PATH, TITLE = "/kv", "KV cache"
METRICS = {"kv_kl": "end-to-end KL (nats/token)", "kv_attn_error": "attention-output error"}
INLINE = {"display": "inline-block", "verticalAlign": "bottom", "marginRight": "12px"}


def layout(state):
    return html.Div([
        html.H2("KV cache"),
        html.Label(["Profile ", profile_picker(state, "kv-profile")]),
        html.Label(["Metric ", dcc.RadioItems(id="kv-metric", options=[{"label": v, "value": k}
                                                                       for k, v in METRICS.items()],
                                              value="kv_kl", inline=True)]),
        html.Div(id="kv-grid"),
        html.Div(id="kv-keys"),
        html.Div([html.Label(["Budget (equivalent bits) ", dcc.Input(id="kv-budget", type="number", value=4, min=2,
                                                                     max=8, step=0.25, style={"width": "90px"})],
                             style=INLINE),
                  html.Label(["Trials ", dcc.Input(id="kv-trials", type="number", value=40, min=1, step=1,
                                                   style={"width": "80px"})], style=INLINE),
                  html.Button("Search (kv-tuner)", id="kv-search", n_clicks=0)], className="row"),
        dcc.Store(id="kv-job"), dcc.Interval(id="kv-poll", interval=500, disabled=True),
        html.Div(id="kv-status"),
        html.Div(id="kv-front"),
    ])


def grid_figure(profile, metric: str) -> go.Figure:
    s = profile.scores[metric]
    names = s.params.get("pair_names", [str(i) for i in range(s.values.shape[1])])
    z = np.log10(np.clip(s.values, 1e-7, None))
    fig = go.Figure(go.Heatmap(z=z, x=names, customdata=s.values, colorscale="Viridis",
                               colorbar={"title": "log10"},
                               hovertemplate="layer %{y}, %{x}: %{customdata:.4g}<extra></extra>"))
    axis = s.params.get("axis", "token")
    fig.update_layout(title=f"{METRICS[metric]} with one layer's cache quantised ({axis} keys)",
                      xaxis_title="(K bits, V bits)", yaxis_title="layer", height=560,
                      yaxis={"autorange": "reversed"})
    return fig


def keys_table(profile) -> html.Table | None:
    table = profile.tables.get("kv_keys_vs_values")
    if table is None or not table.rows:
        return None
    head = html.Tr([html.Th(h) for h in ("more key bits", "KL", "more value bits", "KL", "layers where keys win")])
    rows = [html.Tr([html.Td(r["key_heavy"]), html.Td(f"{r['key_heavy_kl']:.4f}"), html.Td(r["value_heavy"]),
                     html.Td(f"{r['value_heavy_kl']:.4f}"), html.Td(f"{r['layers_key_heavy_better']:.0%}")])
            for r in table.rows]
    return html.Table([head, *rows], className="card", id="kv-keys-table")


def front_figure(meta: dict, chosen: dict) -> go.Figure:
    front = meta["pareto_front"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[p["kv_bits"] for p in front], y=[p["calibration_kl"] for p in front],
                             mode="lines+markers", name="Pareto front (searched)",
                             text=[", ".join(p["pairs"]) for p in front],
                             hovertemplate="%{x:.3f} bits, KL %{y:.4g}<br>groups: %{text}<extra></extra>"))
    uniform = meta.get("uniform", {})
    fig.add_trace(go.Scatter(x=[u["kv_bits"] for u in uniform.values()],
                             y=[u["calibration_kl"] for u in uniform.values()], mode="markers+text",
                             text=list(uniform), textposition="top center", name="uniform pairs",
                             marker={"symbol": "square"}))
    fig.add_trace(go.Scatter(x=[chosen["kv_bits"]], y=[chosen["calibration_kl"]], mode="markers", name="plan",
                             marker={"size": 14, "symbol": "star"}))
    fig.update_layout(title="kv-tuner: equivalent bits against calibration KL", xaxis_title="equivalent KV bits",
                      yaxis_title="calibration KL (nats/token)", yaxis_type="log", height=460)
    return fig


def register(app, state):
    @app.callback(Output("kv-grid", "children"), Output("kv-keys", "children"), Input("kv-profile", "value"),
                  Input("kv-metric", "value"))
    def show(key, metric):
        profile, note = opened_or_notice(state, key)
        if profile is None:
            return note, None
        if metric not in profile.scores:
            return missing("KV-cache sensitivity", "lensbench profile MODEL --out DIR --analyses kv_sensitivity"), None
        return (graph(state.memo(("kv-grid", key, metric), lambda: grid_figure(profile, metric)), "kv-grid-fig"),
                keys_table(profile))

    @app.callback(Output("kv-job", "data"), Output("kv-poll", "disabled"), Output("kv-status", "children"),
                  Input("kv-search", "n_clicks"), State("kv-profile", "value"), State("kv-budget", "value"),
                  State("kv-trials", "value"), prevent_initial_call=True)
    def search_start(_, key, budget, trials):
        profile, note = opened_or_notice(state, key)
        if profile is None:
            return None, True, note
        if "kv_kl" not in profile.scores:
            return None, True, missing("KV-cache sensitivity", "lensbench profile MODEL --out DIR --analyses "
                                                                "kv_sensitivity")

        def job(progress):
            progress(0.05, "loading the model")
            model = state.model_for(profile)
            progress(0.2, f"searching ({trials} trials)")
            plan = make_plan("kv-tuner", profile, budget, model=model, trials=int(trials or 40))
            return {"meta": plan.meta["kv_tuner"], "chosen": plan.predicted, "plan": repr(plan)}

        return state.submit("kv-tuner", job), False, progress_bar("kv-progress")

    @app.callback(Output("kv-front", "children"), Output("kv-poll", "disabled", allow_duplicate=True),
                  Output("kv-status", "children", allow_duplicate=True), Input("kv-poll", "n_intervals"),
                  State("kv-job", "data"), prevent_initial_call=True)
    def search_poll(_, job_id):
        job, stop, status = polled(state, job_id, "kv-progress")
        if job is None:
            return no_update, stop, status
        if job.error:
            return no_update, True, notice(job.error, "error")
        r = job.result
        return graph(front_figure(r["meta"], r["chosen"]), "kv-front-fig"), True, notice(
            f"{r['plan']}: {r['chosen']['kv_bits']:.3f} bits, calibration KL {r['chosen']['calibration_kl']:.4f}",
            "info")
