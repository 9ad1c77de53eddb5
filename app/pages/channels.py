"""Channels: the head channel graph (SVD composition channels), the strongest edges, and the
components of a channel chosen in the table."""
from __future__ import annotations

from dash import Input, Output, dash_table, dcc, html

from lensbench.analyses.channels import ChannelGraph

from ..components import graph, missing, opened_or_notice, profile_picker

PATH, TITLE = "/channels", "Channels"
COLUMNS = ("mode", "writer", "reader", "component", "z", "score")


def layout(state):
    return html.Div([
        html.H2("Channels"),
        html.Label(["Profile ", profile_picker(state, "ch-profile")]),
        html.Label(["Strongest edges shown ", dcc.Slider(id="ch-top", min=20, max=400, step=20, value=200,
                                                         marks={20: "20", 200: "200", 400: "400"})]),
        html.Div(id="ch-graph"),
        dash_table.DataTable([], [{"name": c, "id": c} for c in COLUMNS], id="ch-edges", page_size=10,
                             row_selectable="single", selected_rows=[], style_table={"overflowX": "auto"}),
        html.Div(id="ch-detail"),
    ])


def _row(e: dict) -> dict:
    return {k: (f"{e[k][0]}.{e[k][1]}" if k in ("writer", "reader") else
                round(e[k], 3) if isinstance(e.get(k), float) else e.get(k)) for k in COLUMNS}


def register(app, state):
    @app.callback(Output("ch-graph", "children"), Output("ch-edges", "data"), Output("ch-edges", "selected_rows"),
                  Input("ch-profile", "value"), Input("ch-top", "value"))
    def show(key, top):
        profile, note = opened_or_notice(state, key)
        if profile is None:
            return note, [], []
        if "channels" not in profile.tables:
            return missing("channel graph", "lensbench channels MODEL --out DIR"), [], []
        g = state.memo(("channel-graph", key), lambda: ChannelGraph.from_profile(profile))
        rows = [_row(e) for e in g.edges[:top]]
        return graph(state.memo(("channels", key, top), lambda: g.plot(top)), "ch-fig"), rows, ([0] if rows else [])

    @app.callback(Output("ch-detail", "children"), Input("ch-edges", "selected_rows"), Input("ch-profile", "value"))
    def detail(selected, key):
        profile, _ = opened_or_notice(state, key)
        if profile is None or "channels" not in profile.tables or not selected:
            return None
        e = state.memo(("channel-graph", key), lambda: ChannelGraph.from_profile(profile)).edges[selected[0]]
        items = [html.Li(f"{k}: {v}") for k, v in e.items()]
        return html.Div([html.H4(f"Channel {e['writer'][0]}.{e['writer'][1]} → {e['reader'][0]}.{e['reader'][1]} "
                                 f"({e['mode']}-composition, component {e.get('component')})"), html.Ul(items)],
                        id="ch-detail-box")
