"""`create_app(paths)`: the lensbench workbench, a multi-page Dash app over one or more Profiles.

Pages (one module each in `pages/`, registered in `pages.PAGES`): overview, redundancy & sensitivity,
concept depth, channels, relevance, plan explorer, quantisation (a GPTQ database), KV cache. Heavy results
stay server-side in `State`; callbacks are plain functions of keys. Run with `lensbench app PROFILE_DIR ...
[--host] [--port]` (binds 127.0.0.1 unless told otherwise).
"""
from __future__ import annotations

from dash import Dash, Input, Output, dcc, html
from flask import send_file

from . import plotly_bundle
from .pages import PAGES
from .state import State

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
nav { background: #1f2937; padding: 10px 16px; }
nav a { color: #e5e7eb; margin-right: 18px; text-decoration: none; font-size: 15px; }
nav a:hover { text-decoration: underline; }
main { padding: 12px 20px; }
.picker { min-width: 420px; display: inline-block; vertical-align: middle; }
label { display: block; margin: 8px 0; }
.notice { padding: 10px 14px; margin: 10px 0; border-radius: 4px; background: #eef2ff; }
.notice-warn { background: #fff7ed; } .notice-error { background: #fef2f2; color: #991b1b; }
.card th { text-align: left; padding-right: 16px; } .row > * { margin-right: 8px; }
"""


def create_app(paths=(), model_loader=None, partial_plotly: bool = True) -> Dash:
    """`partial_plotly`: serve plotly.js's cartesian bundle when `./run` has fetched it (see
    `plotly_bundle`); dcc.Graph then uses it instead of loading the full bundle."""
    state = State(list(paths), model_loader)
    app = Dash(__name__, title="lensbench", suppress_callback_exceptions=True,
               update_title=None)
    head = f"<style>{CSS}</style>"
    bundle = plotly_bundle.available() if partial_plotly else None
    if bundle is not None:
        bundle_url = f"/_lensbench/{bundle.name}"
        app.server.add_url_rule(bundle_url, "plotly_bundle", lambda: send_file(
            bundle, mimetype="application/javascript", max_age=365 * 24 * 3600))
        head += f'<script defer src="{app.get_relative_path(bundle_url)}"></script>'  # defines window.Plotly
    app.index_string = app.index_string.replace("{%css%}", "{%css%}" + head)
    app.lensbench_plotly = "cartesian partial bundle" if bundle is not None else "plotly's full bundle"
    routes = {p.PATH: p for p in PAGES}
    app.layout = html.Div([
        dcc.Location(id="url"),
        html.Nav([dcc.Link(p.TITLE, href=p.PATH, id=f"nav-{p.PATH.strip('/') or 'overview'}") for p in PAGES]),
        html.Main(id="page"),
    ])

    @app.callback(Output("page", "children"), Input("url", "pathname"))
    def route(path):
        page = routes.get(path or "/")
        if page is None:
            return html.Div(f"No page at {path}. Pages: " + ", ".join(routes), className="notice notice-warn")
        return page.layout(state)

    for page in PAGES:
        page.register(app, state)
    app.lensbench_state = state
    return app
