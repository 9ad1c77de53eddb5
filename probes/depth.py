"""Concept depth from a probe-accuracy curve (Jin et al., 2025, "Exploring Concept Depth", arXiv 2404.07066):
the jump point and the converging point.

The paper's repository has no code for these points, so the rules are explicit parameters here:

* jump point, rule "half-rise" (default): the first layer whose accuracy reaches the midpoint between
  the curve's minimum and maximum; rule "delta": the first layer whose accuracy exceeds the previous
  layer's by at least `delta`.
* converging point: the first layer whose accuracy is within `eps` of the curve's maximum.

Depths are reported as layer indices and as relative depth index / L (L probe points, index 0..L-1),
as in the paper. A curve that never rises above chance + `min_rise` has no concept depth (None).
"""
from __future__ import annotations

import numpy as np
from .tasks import FAMILIES
from lensbench.errors import ProfileError


def concept_depth(acc, rule: str = "half-rise", delta: float = 0.05, eps: float = 0.01, smooth: int = 1,
                  min_rise: float = 0.05, chance: float = 0.5) -> dict:
    """{"jump", "converging", "jump_rel", "converging_rel", ...} for one accuracy-vs-layer curve."""
    acc = np.asarray(acc, dtype=np.float64)
    if acc.ndim != 1 or len(acc) < 2:
        raise ValueError("concept depth needs an accuracy curve over at least two layers")
    if rule not in ("half-rise", "delta"):
        raise ValueError(f"rule must be 'half-rise' or 'delta', not {rule!r}")
    curve = np.convolve(np.pad(acc, (smooth // 2, smooth - 1 - smooth // 2), mode="edge"),
                        np.ones(smooth) / smooth, mode="valid") if smooth > 1 else acc
    L = len(curve)
    params = {"rule": rule, "delta": delta, "eps": eps, "smooth": smooth, "min_rise": min_rise}
    if curve.max() < chance + min_rise:
        return {"jump": None, "converging": None, "jump_rel": None, "converging_rel": None, "peak": float(acc.max()),
                "params": params}
    if rule == "half-rise":
        level = curve.min() + 0.5 * (curve.max() - curve.min())
        jump = int(np.argmax(curve >= level))
    else:
        rises = np.flatnonzero(np.diff(curve) >= delta)
        jump = int(rises[0] + 1) if len(rises) else 0
    converging = int(np.argmax(curve >= curve.max() - eps))
    return {"jump": jump, "converging": converging, "jump_rel": jump / L, "converging_rel": converging / L,
            "peak": float(acc.max()), "peak_layer": int(acc.argmax()), "params": params}


class ConceptDepthView:
    """The concept-depth results of a Profile: `.plot()` draws accuracy vs layer per task family, with
    the converging points marked; `.table()` is the depth table as a DataFrame."""

    def __init__(self, profile):
        if "concept_depth" not in profile.tables:
            raise ProfileError("this profile has no concept-depth results: run lensbench concept-depth MODEL --out DIR")
        self.profile = profile
        self.rows = profile.tables["concept_depth"].rows

    def table(self):
        return self.profile.tables["concept_depth"].to_frame()

    def __repr__(self) -> str:
        tasks = sorted({r["task"] for r in self.rows})
        return f"ConceptDepthView({len(tasks)} tasks, conditions {sorted({r['condition'] for r in self.rows})})"

    def plot(self, condition: str = "clean", metric: str = "accuracy"):
        import plotly.graph_objects as go  # heavy: plotly, only for figures
        from plotly.colors import qualitative  # heavy: plotly, only for figures
        from plotly.subplots import make_subplots  # heavy: plotly, only for figures

        rows = [r for r in self.rows if r["condition"] == condition]
        fams = [f for f in FAMILIES if any(r["family"] == f for r in rows)] + \
            sorted({r["family"] for r in rows} - set(FAMILIES))
        fig = make_subplots(1, len(fams), subplot_titles=fams, shared_yaxes=True)
        L = int(self.profile.model["n_layers"])
        palette = qualitative.D3 + qualitative.Dark2  # one colour per task, its marker included
        colour = {t: palette[i % len(palette)] for i, t in enumerate(dict.fromkeys(r["task"] for r in rows))}
        for col, fam in enumerate(fams, 1):
            for r in (r for r in rows if r["family"] == fam):
                tag = r["task"] if condition == "clean" else f"{r['task']}@{condition}"
                y = self.profile.scores[f"probe_{metric}_{tag}"].values
                ci = self.profile.scores.get(f"probe_accuracy_ci_{tag}")
                err = {"type": "data", "array": ci.values, "visible": True} if ci is not None and metric == "accuracy" \
                    else None
                c = colour[r["task"]]
                fig.add_trace(go.Scatter(x=list(range(L)), y=y, mode="lines", name=r["task"], error_y=err,
                                         line={"color": c}, legendgroup=r["task"]), 1, col)
                if r.get("converging") is not None:
                    fig.add_trace(go.Scatter(x=[r["converging"]], y=[y[r["converging"]]], mode="markers",
                                             marker={"symbol": "diamond", "size": 11, "color": c,
                                                     "line": {"width": 1, "color": "black"}},
                                             showlegend=False, legendgroup=r["task"],
                                             hovertext=f"{r['task']}: converging point {r['converging_rel']:.2f}"),
                                  1, col)
            fig.update_xaxes(title_text="layer", row=1, col=col)
        fig.update_yaxes(title_text=f"probe test {metric}", row=1, col=1)
        fig.update_layout(title=f"{self.profile.model.get('name')}: probe {metric} vs layer ({condition}); "
                                f"diamonds = converging points", height=500, width=420 * len(fams) + 200,
                          legend={"orientation": "h", "y": -0.22})
        return fig
