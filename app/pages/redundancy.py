"""Redundancy and sensitivity: per-layer curves of any scores, and the layer × layer matrices
(similarity, CKA, skip effect)."""
from __future__ import annotations

import plotly.graph_objects as go
from dash import Input, Output, dcc, html

from ..components import graph, missing, opened_or_notice, profile_picker

PATH, TITLE = "/redundancy", "Redundancy & sensitivity"


def curves(profile) -> list[str]:
    L = int(profile.model.get("n_layers", 0))
    return sorted(n for n, s in profile.scores.items()
                  if s.axes == ("layer",) and s.values.shape == (L,) and s.analysis != "concept_depth")


def matrices(profile) -> list[str]:
    return sorted(n for n, s in profile.scores.items() if s.values.ndim == 2 and s.axes[0] != "ranking"
                  and {"layer", "state", "skipped_layer"} >= set(s.axes))


def layout(state):
    return html.Div([
        html.H2("Redundancy & sensitivity"),
        html.Label(["Profile ", profile_picker(state, "rd-profile")]),
        html.Label(["Per-layer scores ", dcc.Dropdown(id="rd-curves", multi=True, className="picker")]),
        html.Div(id="rd-curve-graph"),
        html.Label(["Matrix ", dcc.Dropdown(id="rd-matrix", clearable=False, className="picker")]),
        html.Div(id="rd-matrix-graph"),
    ])


def curve_figure(profile, names) -> go.Figure:
    fig = go.Figure()
    for n in names:
        s = profile.scores[n]
        arrow = {True: "↑ more important", False: "↓ more important", None: "descriptive"}[s.higher_is_more_important]
        fig.add_trace(go.Scatter(x=list(range(len(s.values))), y=s.values, mode="lines+markers",
                                 name=f"{n} ({arrow})",
                                 hovertemplate=f"{n}<br>layer %{{x}}: %{{y:.4g}}<extra></extra>"))
    fig.update_layout(title="Per-layer scores", xaxis_title="layer", yaxis_title="score (units per metric; hover)",
                      height=420, legend={"orientation": "h", "y": -0.25})
    return fig


def matrix_figure(profile, name) -> go.Figure:
    s = profile.scores[name]
    fig = go.Figure(go.Heatmap(z=s.values, colorscale="Viridis", colorbar={"title": name},
                               hovertemplate=f"{s.axes[0]} %{{y}}, {s.axes[1]} %{{x}}: %{{z:.4g}}<extra></extra>"))
    fig.update_layout(title=f"{name}: {s.description[:110]}", xaxis_title=s.axes[1], yaxis_title=s.axes[0],
                      height=520, yaxis={"autorange": "reversed"})
    return fig


def register(app, state):
    @app.callback(Output("rd-curves", "options"), Output("rd-curves", "value"), Output("rd-matrix", "options"),
                  Output("rd-matrix", "value"), Input("rd-profile", "value"))
    def choices(key):
        profile, _ = opened_or_notice(state, key)
        if profile is None:
            return [], [], [], None
        c, m = curves(profile), matrices(profile)
        default = [n for n in ("block_cosine", "attn_cosine", "mlp_cosine") if n in c] or c[:2]
        return c, default, m, (m[0] if m else None)

    @app.callback(Output("rd-curve-graph", "children"), Input("rd-curves", "value"), Input("rd-profile", "value"))
    def show_curves(names, key):
        profile, note = opened_or_notice(state, key)
        if profile is None:
            return note
        names = [n for n in (names or []) if n in profile.scores]
        if not names:
            return missing("per-layer scores", "lensbench profile MODEL --out DIR")
        return graph(state.memo(("curves", key, *names), lambda: curve_figure(profile, names)), "rd-curve-fig")

    @app.callback(Output("rd-matrix-graph", "children"), Input("rd-matrix", "value"), Input("rd-profile", "value"))
    def show_matrix(name, key):
        profile, note = opened_or_notice(state, key)
        if profile is None:
            return note
        if not name or name not in profile.scores:
            return missing("layer × layer matrix",
                           "lensbench profile MODEL --out DIR --analyses redundancy,skip_effect")
        return graph(state.memo(("matrix", key, name), lambda: matrix_figure(profile, name)), "rd-matrix-fig")
