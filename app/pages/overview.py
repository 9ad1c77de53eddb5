"""Overview: the model card, a layer strip coloured by any ranking, and the agreement between rankings."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, dcc, html

from lensbench.agreement import agreement, rankings

from ..components import graph, missing, opened_or_notice, profile_picker

PATH, TITLE = "/", "Overview"


def layout(state):
    return html.Div([
        html.H2("Overview"),
        html.Label(["Profile ", profile_picker(state, "ov-profile")]),
        html.Div(id="ov-card"),
        html.Label(["Colour layers by ", dcc.Dropdown(id="ov-ranking", clearable=False, className="picker")]),
        html.Label(["Compare with ", dcc.Dropdown(id="ov-compare", options=state.options(), value=None,
                                                  placeholder="another opened profile (optional)",
                                                  className="picker")]),
        html.Div(id="ov-strip"),
        html.Div(id="ov-agreement"),
    ])


def card_table(profile) -> html.Table:
    m = profile.model
    rows = [("model", m.get("name")), ("source", m.get("source")), ("layers", m.get("n_layers")),
            ("d_model", m.get("d_model")), ("weights fingerprint", str(m.get("fingerprint", ""))[:16]),
            ("analyses", ", ".join(sorted(profile.meta.get("analyses", {})) or ["—"])),
            ("scores", len(profile.scores))]
    return html.Table([html.Tr([html.Th(k), html.Td(str(v))]) for k, v in rows], className="card")


def strip_figure(profile, name: str, title: str | None = None) -> go.Figure:
    imp = rankings(profile)[name]
    L = len(imp)
    order = np.argsort(-imp, kind="stable")
    rank = np.empty(L, dtype=int)
    rank[order] = np.arange(1, L + 1)
    fig = go.Figure(go.Heatmap(z=[imp], x=list(range(L)), y=[name], colorscale="Viridis",
                               colorbar={"title": {"text": "importance", "side": "right"}, "thickness": 14,
                                         "len": 1.3}, text=[[f"rank {r}" for r in rank]],
                               hovertemplate="layer %{x}<br>importance %{z:.4g}<br>%{text}<extra></extra>"))
    fig.update_layout(title=title or f"Layers coloured by {name} (brighter = more important)", height=250,
                      xaxis_title="layer", margin={"l": 160})
    return fig


def agreement_figure(profile) -> go.Figure | None:
    s = profile.scores.get("ranking_agreement") or agreement(profile)
    if s is None:
        return None
    names = s.params["rankings"]
    fig = go.Figure(go.Heatmap(z=s.values, x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu",
                               colorbar={"title": "Spearman ρ"}, texttemplate="%{z:.2f}",
                               hovertemplate="%{y} vs %{x}: ρ = %{z:.2f}<extra></extra>"))
    fig.update_layout(title="Agreement between layer rankings (Spearman ρ of importances)",
                      height=260 + 28 * len(names), xaxis={"tickangle": -40})
    return fig


def register(app, state):
    def ranking_names(key, profile) -> list[str]:
        return state.memo(("ranking-names", key), lambda: sorted(rankings(profile)))

    @app.callback(Output("ov-card", "children"), Output("ov-ranking", "options"), Output("ov-ranking", "value"),
                  Output("ov-agreement", "children"), Input("ov-profile", "value"))
    def show_profile(key):
        profile, note = opened_or_notice(state, key)
        if profile is None:
            return note, [], None, None
        names = ranking_names(key, profile)
        fig = state.memo(("agreement", key), lambda: agreement_figure(profile))
        agree = graph(fig, "ov-agreement-graph") if fig is not None else \
            missing("pair of layer rankings", "lensbench profile MODEL --out DIR")
        return card_table(profile), names, (names[0] if names else None), agree

    @app.callback(Output("ov-strip", "children"), Input("ov-ranking", "value"), Input("ov-profile", "value"),
                  Input("ov-compare", "value"))
    def show_strip(name, key, other):
        profile, note = opened_or_notice(state, key)
        if profile is None:
            return note
        if not name or name not in ranking_names(key, profile):
            return missing("layer ranking", "lensbench profile MODEL --out DIR")
        out = [graph(state.memo(("strip", key, name), lambda: strip_figure(profile, name)), "ov-strip-graph")]
        if other and other != key:
            second, note = opened_or_notice(state, other)
            if second is None:
                out.append(note)
            elif name not in rankings(second):
                out.append(missing(f"{name} ranking in the compared profile", "lensbench profile MODEL --out DIR"))
            else:
                fig = state.memo(("compare-strip", other, name), lambda: strip_figure(
                    second, name, title=f"Compared: {second.model.get('name')} — {name}"))
                out.append(graph(fig, "ov-compare-graph"))
        return out
