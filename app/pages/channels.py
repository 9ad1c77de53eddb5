"""Channels: the head channel graph (SVD composition channels), the strongest edges, and for the
channel chosen in the table its components: the writer's and reader's singular spectra and every
component of that head pair that clears the null."""
from __future__ import annotations

import plotly.graph_objects as go
from dash import Input, Output, dash_table, dcc, html
from plotly.subplots import make_subplots

from lensbench.analyses.channels import ChannelGraph

from ..components import graph, missing, notice, opened_or_notice, profile_picker

PATH, TITLE = "/channels", "Channels"
COLUMNS = (("mode", "mode"), ("writer", "writer head"), ("component", "writer component"),
           ("reader", "reader head"), ("z", "z over null"), ("score", "composition score"))
HELP = ("Each edge is one singular component of a writer head's W_OV that a later reader head reads through "
        "its query (Q), key (K) or value (V) weights. Heads are written layer.head. Composition score: share of "
        "the component's norm that the reader's weights keep (0–1); z: how many null standard deviations it "
        "lies above heads that cannot feed the reader.")


def layout(state):
    return html.Div([
        html.H2("Channels"),
        html.Label(["Profile ", profile_picker(state, "ch-profile")]),
        html.Label(["Strongest edges shown ", dcc.Slider(id="ch-top", min=20, max=400, step=20, value=200,
                                                         marks={20: "20", 200: "200", 400: "400"})]),
        html.Div(id="ch-graph"),
        html.P(HELP, style={"maxWidth": "70em", "fontSize": "14px"}),
        dash_table.DataTable([], [{"name": label, "id": c} for c, label in COLUMNS], id="ch-edges", page_size=10,
                             row_selectable="single", selected_rows=[], style_table={"overflowX": "auto"},
                             style_cell={"textAlign": "left"}),
        html.Div(id="ch-detail"),
    ])


def head(h) -> str:
    return f"{h[0]}.{h[1]}"


def _row(e: dict) -> dict:
    return {"mode": e["mode"], "writer": head(e["writer"]), "component": e["component"],
            "reader": head(e["reader"]), "z": round(e["z"], 1), "score": round(e["score"], 3)}


def component_figure(profile, edges: list[dict], e: dict) -> go.Figure:
    """Left: the writer's and reader's W_OV singular spectra, the channel's component marked.
    Right: every component of this writer -> reader pair that clears the null, by mode."""
    fig = make_subplots(1, 2, column_widths=[0.6, 0.4], subplot_titles=(
        f"W_OV singular values: writer {head(e['writer'])}, reader {head(e['reader'])}",
        f"{head(e['writer'])} → {head(e['reader'])}: its components among the {len(edges)} strongest edges"))
    spectra = profile.scores.get("ov_singular_values")
    if spectra is not None:
        w, r = spectra.values[e["writer"][0], e["writer"][1]], spectra.values[e["reader"][0], e["reader"][1]]
        fig.add_trace(go.Bar(x=list(range(len(w))), y=w, name=f"writer {head(e['writer'])}", marker_color="#a3acb9",
                             hovertemplate="writer component %{x}: σ = %{y:.3g}<extra></extra>"), 1, 1)
        fig.add_trace(go.Scatter(x=list(range(len(r))), y=r, mode="lines", name=f"reader {head(e['reader'])}",
                                 line={"color": "#111"},
                                 hovertemplate="reader component %{x}: σ = %{y:.3g}<extra></extra>"), 1, 1)
        fig.add_trace(go.Scatter(x=[e["component"]], y=[e["sigma"]], mode="markers", name="this channel",
                                 marker={"symbol": "star", "size": 14, "color": "#d62728"},
                                 hovertemplate="component %{x}: σ = %{y:.3g}<extra></extra>"), 1, 1)
    pair = [x for x in edges if x["writer"] == e["writer"] and x["reader"] == e["reader"]]
    colours = {"Q": "#1f77b4", "K": "#2ca02c", "V": "#d62728"}
    for mode in ("Q", "K", "V"):
        xs = [x for x in pair if x["mode"] == mode]
        if xs:
            fig.add_trace(go.Bar(x=[f"c{x['component']}" for x in xs], y=[x["z"] for x in xs], name=f"{mode}",
                                 marker_color=colours[mode], customdata=[x["score"] for x in xs],
                                 hovertemplate=f"{mode}, %{{x}}: z = %{{y:.1f}}, score %{{customdata:.3f}}"
                                               "<extra></extra>"), 1, 2)
    fig.update_xaxes(title_text="singular component (descending σ)", row=1, col=1)
    fig.update_yaxes(title_text="singular value σ", row=1, col=1)
    fig.update_xaxes(title_text="writer component", row=1, col=2)
    fig.update_yaxes(title_text="z over the null (std devs)", row=1, col=2)
    fig.update_layout(height=380, barmode="group", legend={"orientation": "h", "y": -0.25}, margin={"t": 60})
    return fig


def register(app, state):
    def channel_graph(key, profile):
        return state.memo(("channel-graph", key), lambda: ChannelGraph.from_profile(profile))

    @app.callback(Output("ch-graph", "children"), Output("ch-edges", "data"), Output("ch-edges", "selected_rows"),
                  Input("ch-profile", "value"), Input("ch-top", "value"))
    def show(key, top):
        profile, note = opened_or_notice(state, key)
        if profile is None:
            return note, [], []
        if "channels" not in profile.tables:
            return missing("channel graph", "lensbench channels MODEL --out DIR"), [], []
        g = channel_graph(key, profile)
        rows = [_row(e) for e in g.edges[:top]]
        return graph(state.memo(("channels", key, top), lambda: g.plot(top)), "ch-fig"), rows, ([0] if rows else [])

    @app.callback(Output("ch-detail", "children"), Input("ch-edges", "selected_rows"), Input("ch-profile", "value"))
    def detail(selected, key):
        profile, _ = opened_or_notice(state, key)
        if profile is None or "channels" not in profile.tables or not selected:
            return None
        g = channel_graph(key, profile)
        e = g.edges[selected[0]]
        fig = state.memo(("channel-detail", key, selected[0]), lambda: component_figure(profile, g.edges, e))
        parts = [html.H4(f"Channel {head(e['writer'])} → {head(e['reader'])} ({e['mode']}-composition, "
                         f"writer component {e['component']})"),
                 html.P(f"σ = {e['sigma']:.3g}, composition score {e['score']:.3f}, z = {e['z']:.1f} over the "
                        "null."),
                 graph(fig, "ch-detail-fig")]
        if "ov_singular_values" not in profile.scores:
            parts.insert(2, notice("This profile has no singular spectra; rerun `lensbench channels MODEL "
                                   "--out DIR` to add them.", "warn"))
        return html.Div(parts, id="ch-detail-box")
