"""Concept depth: probe accuracy / selectivity vs layer per task family, converging points, conditions."""
from __future__ import annotations

from dash import Input, Output, dash_table, dcc, html

from lensbench.probes.depth import ConceptDepthView

from ..components import graph, missing, opened_or_notice, profile_picker

PATH, TITLE = "/concept-depth", "Concept depth"


def layout(state):
    return html.Div([
        html.H2("Concept depth"),
        html.Label(["Profile ", profile_picker(state, "cd-profile")]),
        html.Label(["Condition ", dcc.Dropdown(id="cd-condition", clearable=False, className="picker")]),
        dcc.RadioItems(id="cd-metric", options=[{"label": " accuracy", "value": "accuracy"},
                                                 {"label": " selectivity (task − control)", "value": "selectivity"},
                                                 {"label": " AUC", "value": "auc"}],
                       value="accuracy", inline=True),
        html.Div(id="cd-graph"),
        html.Div(id="cd-table"),
    ])


def register(app, state):
    @app.callback(Output("cd-condition", "options"), Output("cd-condition", "value"), Input("cd-profile", "value"))
    def conditions(key):
        profile, _ = opened_or_notice(state, key)
        if profile is None or "concept_depth" not in profile.tables:
            return [], None
        conds = list(dict.fromkeys(r["condition"] for r in profile.tables["concept_depth"].rows))
        return conds, conds[0]

    @app.callback(Output("cd-graph", "children"), Output("cd-table", "children"), Input("cd-profile", "value"),
                  Input("cd-condition", "value"), Input("cd-metric", "value"))
    def show(key, condition, metric):
        profile, note = opened_or_notice(state, key)
        if profile is None:
            return note, None
        if "concept_depth" not in profile.tables:
            return missing("concept-depth results", "lensbench concept-depth MODEL --tasks all --out DIR"), None
        if metric == "selectivity" and condition != "clean":
            return missing(f"control task under the {condition} condition (controls run on clean inputs)",
                           "lensbench concept-depth MODEL --out DIR"), None
        condition = condition or "clean"
        fig = state.memo(("concept", key, condition, metric), lambda: figure(profile, condition, metric))
        records, columns = state.memo(("concept-table", key, condition), lambda: table_data(profile, condition))
        table = dash_table.DataTable(records, columns, id="cd-depth-table", page_size=15,
                                     style_table={"overflowX": "auto"})
        return graph(fig, "cd-fig"), table


def figure(profile, condition: str, metric: str):
    fig = ConceptDepthView(profile).plot(condition, metric)
    fig.update_layout(width=None, autosize=True)
    return fig


def table_data(profile, condition: str) -> tuple[list[dict], list[dict]]:
    frame = ConceptDepthView(profile).table()
    frame = frame[frame["condition"] == condition]
    return frame.round(3).to_dict("records"), [{"name": c, "id": c} for c in frame.columns]
