"""`lensbench report PROFILE --out NAME.html [--eval EVAL.json ...]`: a static, self-contained HTML report with
the app's figures (plotly.js inlined once), viewable without a server. Sections without results say so; plan
evaluations (`lensbench evaluate` records) get a table and the quality-vs-compression chart."""
from __future__ import annotations

import html as _html
from pathlib import Path

from lensbench.agreement import rankings
from lensbench.atomic import write_text
from lensbench.profiles import Profile

from .pages.overview import agreement_figure, strip_figure
from .pages.plans import front_figure, front_point
from .pages.redundancy import curve_figure, curves, matrices, matrix_figure
from lensbench.analyses.channels import ChannelGraph
from lensbench.probes.depth import ConceptDepthView


def _section(title: str, figs: list, note: str | None = None) -> str:
    body = "".join(f.to_html(full_html=False, include_plotlyjs=False) for f in figs)
    if note:
        body = f"<p class='note'>{_html.escape(note)}</p>" + body
    return f"<section><h2>{_html.escape(title)}</h2>{body}</section>"


def _plans_section(evaluations: dict[str, dict]) -> str:
    head = ("<tr><th>plan</th><th>what it changes</th><th>held-out KL (nats/token)</th><th>perplexity (dense)</th>"
            "<th>prefill × dense</th><th>decode × dense</th><th>weights, fraction of dense</th></tr>")
    rows, points = [], []
    for label, r in evaluations.items():
        plan = r.get("plan", {})
        quant = ", ".join(f"{n} × {kind}" for kind, n in sorted(plan.get("quant_entries", {}).items()))
        units = plan.get("units", [])
        what = "; ".join(x for x in (f"removes {', '.join(units)}" if units else "",
                                     quant + (f" ({plan['average_bits']} average bits)" if "average_bits" in plan
                                              else "")) if x)
        point = front_point(label, r)
        rows.append(f"<tr><td>{_html.escape(label)}</td><td>{_html.escape(what or 'nothing')}</td>"
                    f"<td>{r['kl_to_dense']:.4f}</td><td>{r['perplexity']:.1f} ({r['dense_perplexity']:.1f})</td>"
                    f"<td>{r.get('prefill_speed_ratio', float('nan')):.2f}</td>"
                    f"<td>{r.get('decode_speed_ratio', float('nan')):.2f}</td>"
                    f"<td>{point['weight_fraction']:.3f}</td></tr>")
        points.append(point)
    note = ("Each plan applied for real and measured against the dense model on held-out text "
            "(lensbench evaluate); speed ratios are medians of interleaved rounds, batch 1.")
    fig = front_figure(points).update_layout(title="Quality vs compression (colour: decode speed-up vs dense)")
    return (f"<section><h2>Plans</h2><p>{_html.escape(note)}</p><table class='evals'>{head}{''.join(rows)}</table>"
            f"{fig.to_html(full_html=False, include_plotlyjs=False)}</section>")


def report_html(profile: Profile, evaluations: dict[str, dict] | None = None) -> str:
    """The report of `profile`; `evaluations` ({label: evaluate() record}) adds a Plans section."""
    import plotly.offline  # heavy: plotly, only for figures

    m = profile.model
    parts = []
    ranks = sorted(rankings(profile))
    figs = [strip_figure(profile, r) for r in ranks[:3]]
    agree = agreement_figure(profile)
    parts.append(_section("Overview", figs + ([agree] if agree is not None else []),
                          None if ranks else "No layer rankings in this profile (run lensbench profile)."))
    c, mats = curves(profile), matrices(profile)
    parts.append(_section("Redundancy & sensitivity",
                          ([curve_figure(profile, c[:6])] if c else []) + [matrix_figure(profile, n) for n in mats[:3]],
                          None if c else "No per-layer scores."))
    if "concept_depth" in profile.tables:
        view = ConceptDepthView(profile)
        conds = list(dict.fromkeys(r["condition"] for r in view.rows))
        parts.append(_section("Concept depth", [view.plot(cond) for cond in conds]))
    else:
        parts.append(_section("Concept depth", [], "No concept-depth results (run lensbench concept-depth)."))
    if "channels" in profile.tables:
        parts.append(_section("Channels", [ChannelGraph.from_profile(profile).plot()]))
    else:
        parts.append(_section("Channels", [], "No channel graph (run lensbench channels)."))
    rel = [profile.scores[n] for n in ("relevance_block", "relevance_heads") if n in profile.scores]
    parts.append(_section("Relevance (DynamicLRP)", [s.plot() for s in rel],
                          None if rel else "No relevance scores (run lensbench relevance)."))
    if evaluations:
        parts.append(_plans_section(evaluations))
    js = plotly.offline.get_plotlyjs()
    title = _html.escape(f"lensbench report: {m.get('name')}")
    card = "".join(f"<tr><th>{_html.escape(str(k))}</th><td>{_html.escape(str(v))}</td></tr>"
                   for k, v in m.items() if k in ("name", "source", "n_layers", "d_model", "fingerprint", "title"))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><script>{js}</script>"
            "<style>body{font-family:system-ui,sans-serif;margin:20px} th{text-align:left;padding-right:14px}"
            ".note{background:#fff7ed;padding:8px} .evals td{padding:2px 10px;text-align:right}</style></head>"
            f"<body><h1>{title}</h1><table>{card}</table>{''.join(parts)}</body></html>")


def write_report(profile_path, out, evaluations: dict[str, dict] | None = None) -> Path:
    out = Path(out)
    write_text(out, report_html(Profile.load(profile_path), evaluations))
    return out
