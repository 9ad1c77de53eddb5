"""Quantisation: a GPTQ database's measurements (`lensbench quant-db MODEL --out DB`, opened as `DB/profile`),
and the bit-allocation study run on it when a `study.json` lies beside that profile folder
(`benchmarks/quant_study.py` writes reports/quant-db-<model>/{profile,study.json}).

Per linear, the normalised layer error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) (or HAWQ's trace score) at a chosen level as a
layer × linear heatmap; per block, every level's error against depth, and the calibration KL measured with only
that block quantised; and how fast GPTQ's error grows per bit removed (the median over linears of the error
ratio between neighbouring levels, against the 4x per bit that the rate-distortion model behind BAQ assumes).
The study: held-out KL against average bits, one line per allocation method, and its table."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, dcc, html

from lensbench.errors import LensbenchError
from lensbench.jsonio import read_document

from ..components import graph, missing, notice, opened_or_notice, profile_picker

PATH, TITLE = "/quant", "Quantisation"
SCORES = {"gptq_nmse": "GPTQ layer error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)", "hawq": "HAWQ trace score Σ tr(H)/n ||ΔW||²"}
COMMAND = "lensbench quant-db MODEL --out DB, then lensbench app DB/profile"


def levels(profile) -> list[int]:
    found = (re.fullmatch(r"gptq_nmse_linear_int(\d+)", n) for n in profile.scores)
    return sorted(int(m.group(1)) for m in found if m)


def layout(state):
    return html.Div([
        html.H2("Quantisation: the GPTQ database"),
        html.Label(["Profile ", profile_picker(state, "qt-profile")]),
        html.Label(["Score ", dcc.RadioItems(id="qt-score", options=[{"label": v, "value": k}
                                                                     for k, v in SCORES.items()],
                                             value="gptq_nmse", inline=True)]),
        html.Label(["Level ", dcc.RadioItems(id="qt-level", inline=True)]),
        html.Div(id="qt-linears"),
        html.Div(id="qt-blocks"),
        html.Div(id="qt-ratios"),
        html.Div(id="qt-study"),
    ])


def linear_figure(profile, score: str, bits: int) -> go.Figure:
    s = profile.scores[f"{score}_linear_int{bits}"]
    names = s.params.get("linears") or [str(i) for i in range(s.values.shape[1])]
    z = np.log10(np.clip(s.values, 1e-12, None))
    fig = go.Figure(go.Heatmap(z=z, x=names, customdata=s.values, colorscale="Viridis", colorbar={"title": "log10"},
                               hovertemplate="layer %{y}, %{x}: %{customdata:.4g}<extra></extra>"))
    fig.update_layout(title=f"{SCORES[score]} per linear at int{bits} (group {s.params.get('group_size')}, "
                            f"{s.params.get('scheme')})", xaxis_title="linear", yaxis_title="layer", height=560,
                      yaxis={"autorange": "reversed"})
    return fig


def block_figure(profile, score: str) -> go.Figure:
    fig = go.Figure()
    for b in levels(profile):
        v = profile.scores[f"{score}_block_int{b}"].values
        fig.add_trace(go.Scatter(x=list(range(len(v))), y=v, mode="lines+markers", name=f"int{b}",
                                 hovertemplate=f"int{b}, layer %{{x}}: %{{y:.4g}}<extra></extra>"))
    fig.update_layout(title=f"{SCORES[score]} per block, every level", xaxis_title="layer", yaxis_title=score,
                      yaxis_type="log", height=420, legend={"orientation": "h", "y": -0.25})
    return fig


def kl_figure(profile) -> go.Figure | None:
    names = [f"gptq_kl_block_int{b}" for b in levels(profile) if f"gptq_kl_block_int{b}" in profile.scores]
    if not names:
        return None
    fig = go.Figure()
    for n in names:
        v = profile.scores[n].values
        fig.add_trace(go.Scatter(x=list(range(len(v))), y=v, mode="lines+markers", name=n.rsplit("_", 1)[1],
                                 hovertemplate=f"{n}, layer %{{x}}: %{{y:.4g}}<extra></extra>"))
    fig.update_layout(title="Calibration KL with only this block quantised (GPTQ), every level", height=420,
                      xaxis_title="layer", yaxis_title="KL (nats/token)", yaxis_type="log",
                      legend={"orientation": "h", "y": -0.25})
    return fig


def ratio_rows(profile) -> list[dict]:
    """Per pair of neighbouring levels (lo, hi): the median and spread over linears of err(lo) / err(hi)."""
    lv, out = levels(profile), []
    for lo, hi in zip(lv[:-1], lv[1:], strict=True):
        a = profile.scores[f"gptq_nmse_linear_int{lo}"].values.ravel()
        b = profile.scores[f"gptq_nmse_linear_int{hi}"].values.ravel()
        r = a[b > 0] / b[b > 0]
        if r.size:
            out.append({"levels": f"int{lo} / int{hi}", "median": float(np.median(r)),
                        "q10": float(np.quantile(r, 0.1)), "q90": float(np.quantile(r, 0.9)),
                        "model": 4.0 ** (hi - lo)})
    return out


def ratio_table(profile) -> html.Table:
    head = html.Tr([html.Th(h) for h in ("levels", "median error ratio over linears", "10%-90% of linears",
                                         "BAQ's model, 4^(bits apart)")])
    rows = [html.Tr([html.Td(r["levels"]), html.Td(f"{r['median']:.2f}"), html.Td(f"{r['q10']:.2f}-{r['q90']:.2f}"),
                     html.Td(f"{r['model']:g}")]) for r in ratio_rows(profile)]
    return html.Table([head, *rows], className="card", id="qt-ratio-table")


def study_file(path: str) -> Path:
    """Where the study of a database profile opened from `path` (its folder or profile.json) lies."""
    folder = Path(path)
    folder = folder.parent if folder.suffix == ".json" else folder
    return folder.parent / "study.json"


def study_figure(doc: dict) -> go.Figure:
    by_method: dict[str, list] = {}
    for r in sorted(doc["rows"], key=lambda r: r["bits"]):
        by_method.setdefault(f"{r['method']} (g{r.get('group_size', 128)})", []).append(r)
    fig = go.Figure()
    for method, rows in by_method.items():
        fig.add_trace(go.Scatter(x=[r["bits"] for r in rows], y=[r["kl"] for r in rows], mode="lines+markers",
                                 name=method, text=[f"budget {r['budget']:g}, perplexity {r['ppl']:.2f}" for r in rows],
                                 hovertemplate=f"{method}<br>%{{x:.3f}} bits, KL %{{y:.4g}}, %{{text}}<extra></extra>"))
    fig.update_layout(title=f"Bit allocation study on {doc.get('model', '?')}: held-out KL against average bits",
                      xaxis_title="average code bits over the blocks' linears", yaxis_title="held-out KL (nats/token)",
                      yaxis_type="log", height=480, legend={"orientation": "h", "y": -0.25})
    return fig


def study_table(doc: dict) -> html.Table:
    head = html.Tr([html.Th(h) for h in ("budget", "method", "group", "average bits", "held-out KL", "perplexity",
                                         "topic accuracy", "run")])
    rows = []
    for r in sorted(doc["rows"], key=lambda r: (r["budget"], r["kl"])):
        rows.append(html.Tr([html.Td(f"{r['budget']:g}"), html.Td(r["method"]), html.Td(r.get("group_size", 128)),
                             html.Td(f"{r['bits']:.3f}"), html.Td(f"{r['kl']:.4f}"), html.Td(f"{r['ppl']:.2f}"),
                             html.Td(f"{r['topic']:.3f}"), html.Td(r.get("date", ""))]))
    return html.Table([head, *rows], className="card", id="qt-study-table")


def study_view(path: str):
    f = study_file(path)
    if not f.is_file():
        return notice(f"No allocation study beside this database ({f} does not exist): python "
                      f"benchmarks/quant_study.py writes one.", "info")
    try:
        doc = read_document(f, LensbenchError, "run benchmarks/quant_study.py again")
    except LensbenchError as exc:
        return notice(str(exc), "error")
    return html.Div([graph(study_figure(doc), "qt-study-fig"), study_table(doc)])


def register(app, state):
    @app.callback(Output("qt-level", "options"), Output("qt-level", "value"), Input("qt-profile", "value"))
    def choices(key):
        profile, _ = opened_or_notice(state, key)
        lv = levels(profile) if profile is not None else []
        return [{"label": f"int{b}", "value": b} for b in lv], (3 if 3 in lv else (lv[0] if lv else None))

    @app.callback(Output("qt-study", "children"), Input("qt-profile", "value"))
    def study(key):
        profile, _ = opened_or_notice(state, key)
        if profile is None or not levels(profile):
            return None
        return study_view(state.get(key).path)

    @app.callback(Output("qt-linears", "children"), Output("qt-blocks", "children"), Output("qt-ratios", "children"),
                  Input("qt-profile", "value"), Input("qt-score", "value"), Input("qt-level", "value"))
    def show(key, score, bits):
        profile, note = opened_or_notice(state, key)
        if profile is None:
            return note, None, None
        if not levels(profile):
            return missing("GPTQ database scores", COMMAND), None, None
        if bits not in levels(profile):
            return None, None, None  # the level choices are being refreshed for this profile
        kl = state.memo(("qt-kl", key), lambda: kl_figure(profile))
        blocks = [graph(state.memo(("qt-blocks", key, score), lambda: block_figure(profile, score)), "qt-block-fig")]
        if kl is not None:
            blocks.append(graph(kl, "qt-kl-fig"))
        return (graph(state.memo(("qt-linears", key, score, bits), lambda: linear_figure(profile, score, bits)),
                      "qt-linear-fig"), html.Div(blocks), ratio_table(profile))
