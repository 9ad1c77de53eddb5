"""plotly figures for a Relevance: a token heatmap and a layer × token map (diverging, zero-centred)."""
from __future__ import annotations

import numpy as np
from lensbench.atomic import write_text


def _limit(a: np.ndarray) -> float:
    m = float(np.nanmax(np.abs(a))) if a.size else 1.0
    return m if m > 0 else 1.0


def token_heatmap(rel):
    import plotly.graph_objects as go  # heavy: plotly, only for figures

    m = _limit(rel.scores)
    labels = [f"{i}:{t}" for i, t in enumerate(rel.tokens)]
    fig = go.Figure(go.Heatmap(z=[rel.scores], x=labels, y=["relevance"], zmid=0, zmin=-m, zmax=m,
                               colorscale="RdBu_r", text=[[f"{t}" for t in rel.tokens]], texttemplate="%{text}",
                               colorbar={"title": {"text": "relevance", "side": "right"}, "len": 1.15,
                                         "thickness": 14, "nticks": 5},
                               hovertemplate="token %{x}<br>relevance %{z:.4f}<extra></extra>"))
    fig.update_layout(title=f"DynamicLRP relevance per input token for {rel.target!r} "
                            f"(start {rel.start:.2f}, {rel.model})",
                      height=300, margin={"t": 60, "b": 90},
                      xaxis={"title": "input token (position:text)", "tickangle": -45})
    return fig


def layer_token_map(rel):
    import plotly.graph_objects as go  # heavy: plotly, only for figures

    z = np.vstack([rel.scores[None], rel.layer_tokens])
    m = _limit(z)
    labels = [f"{i}:{t}" for i, t in enumerate(rel.tokens)]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=["embeddings"] + [f"block {i}" for i in range(len(rel.layer_tokens))],
                               zmid=0, zmin=-m, zmax=m, colorscale="RdBu_r", colorbar={"title": "relevance"},
                               hovertemplate="%{y}, token %{x}<br>relevance %{z:.4f}<extra></extra>"))
    fig.update_layout(title=f"Relevance of each block's output per position, for {rel.target!r} ({rel.model})",
                      height=max(300, 18 * len(z) + 120), xaxis={"title": "input token (position:text)",
                                                                "tickangle": -45},
                      yaxis={"title": "residual stream after", "autorange": "reversed"})
    return fig


def write_html(rel, path) -> None:
    """Both figures in one self-contained HTML file (plotly.js inlined once; viewable offline)."""

    tokens = token_heatmap(rel).to_html(full_html=False, include_plotlyjs=True)
    layers = layer_token_map(rel).to_html(full_html=False, include_plotlyjs=False)
    c = rel.conservation
    note = (f"coverage {c.get('coverage', 0):.2%} of {c.get('nodes')} autograd nodes; end-to-end conservation error "
            f"{c.get('end_to_end_error', 0):.1e}; absorbed: " +
            ", ".join(f"{k} {v:.3f}" for k, v in c.get("absorbed", {}).items()))
    write_text(path, f"<!doctype html><html><head><meta charset='utf-8'><title>DynamicLRP: {rel.model}</title></head>"
                     f"<body><p>{note}</p>{tokens}{layers}</body></html>")
