"""reports/CONCEPT_DEPTH.md from saved concept-depth profiles: per-task depths, the family ordering
(factual before emotional before inferential, as the paper reports — checked, not assumed) and the
shift of the curves under the robustness conditions. Figures are rendered to PNG with headless
Chromium when it is installed (the HTML figures need no server either).

Usage: python -m lensbench.probes.report reports/concept-depth
  expects MODEL/ (clean, all tasks) and MODEL-robust/ (conditions) profile directories inside.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

from lensbench.atomic import write_text
from lensbench.browser import render_png
from lensbench.profiles import Profile

from .depth import ConceptDepthView
from .tasks import FAMILIES


def _fmt(v, digits=2):
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def figure(fig, png: Path, alt: str, root: Path) -> list[str]:
    """Markdown lines for `fig` rendered to `png` (none when no browser is installed)."""
    return [f"![{alt}]({png.relative_to(root.parent).as_posix()})", ""] if render_png(fig, png) else []


def task_table(profile: Profile) -> list[str]:
    L = int(profile.model["n_layers"])
    lines = ["| task | family | peak accuracy (layer) | control at peak | max selectivity | jump (rel.) | "
             "converging (rel.) |", "|---|---|---|---|---|---|---|"]
    rows = sorted((r for r in profile.tables["concept_depth"].rows if r["condition"] == "clean"),
                  key=lambda r: (FAMILIES.index(r["family"]) if r["family"] in FAMILIES else 9, r["task"]))
    for r in rows:
        acc = profile.scores[f"probe_accuracy_{r['task']}"].values
        ci = profile.scores[f"probe_accuracy_ci_{r['task']}"].values
        ctrl = profile.scores.get(f"probe_control_{r['task']}")
        peak = int(acc.argmax())
        lines.append(f"| {r['task']} | {r['family']} | {acc[peak]:.3f} ± {ci[peak]:.3f} ({peak}/{L}) | "
                     f"{_fmt(ctrl.values[peak] if ctrl is not None else None, 3)} | "
                     f"{_fmt(r.get('max_selectivity'), 3)} | {_fmt(r['jump_rel'])} | {_fmt(r['converging_rel'])} |")
    return lines


def family_ordering(profile: Profile, key: str = "converging_rel") -> tuple[list[str], dict]:
    rows = [r for r in profile.tables["concept_depth"].rows if r["condition"] == "clean" and r[key] is not None]
    by = {f: [r[key] for r in rows if r["family"] == f] for f in FAMILIES}
    means = {f: float(np.mean(v)) if v else float("nan") for f, v in by.items()}
    pairs = {}
    for a, b in itertools.combinations(FAMILIES, 2):  # share of task pairs where family a is shallower
        cmp = [(x < y) + 0.5 * (x == y) for x, y in itertools.product(by[a], by[b])]
        pairs[f"{a} < {b}"] = float(np.mean(cmp)) if cmp else float("nan")
    order = sorted(FAMILIES, key=lambda f: means[f])
    confirmed = order == list(FAMILIES)
    lines = [f"| family | tasks | mean {key.replace('_rel', '')} (relative depth) |", "|---|---|---|"]
    lines += [f"| {f} | {len(by[f])} | {_fmt(means[f], 3)} |" for f in FAMILIES]
    lines += ["", "Share of task pairs in which the first family is shallower: " +
              ", ".join(f"{k}: {v:.2f}" for k, v in pairs.items()) + ".",
              f"Observed order: {' < '.join(order)} — the paper's factual < emotional < inferential is "
              f"**{'confirmed' if confirmed else 'not reproduced'}** on this model by {key.replace('_rel', '')} "
              f"points."]
    return lines, {"means": means, "pairs": pairs, "confirmed": confirmed}


def robustness(profile: Profile) -> list[str]:
    rows = profile.tables["concept_depth"].rows
    L = int(profile.model["n_layers"])
    lines = ["| task | condition | peak accuracy | Δ peak vs clean | mean |Δ accuracy| over layers | "
             "converging (rel.) | Δ converging |", "|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        clean = profile.scores[f"probe_accuracy_{task}"].values
        c_row = next(r for r in rows if r["task"] == task and r["condition"] == "clean")
        for r in (r for r in rows if r["task"] == task):
            tag = task if r["condition"] == "clean" else f"{task}@{r['condition']}"
            acc = profile.scores[f"probe_accuracy_{tag}"].values
            shift = None if r["converging_rel"] is None or c_row["converging_rel"] is None else \
                r["converging_rel"] - c_row["converging_rel"]
            lines.append(f"| {task} | {r['condition']} | {acc.max():.3f} ({int(acc.argmax())}/{L}) | "
                         f"{acc.max() - clean.max():+.3f} | {np.abs(acc - clean).mean():.3f} | "
                         f"{_fmt(r['converging_rel'])} | {'—' if shift is None else f'{shift:+.2f}'} |")
    return lines


def write(root: Path) -> Path:
    out = ["# Concept depth on the bundled models", "",
           "Written by `python -m lensbench.probes.report reports/concept-depth` from the profiles of "
           "`lensbench concept-depth` (commands in each profile's meta). Probes: L2 logistic regression on "
           "the paper's tap (SmolLM2: normalised mid-block state, last token) or the residual stream "
           "(MiniLM, mean over tokens); C by k-fold CV; test accuracy on a stratified 20% split; "
           "± = 95% t-interval over seeds. Control: the same probe on shuffled labels. Depths: jump = "
           "half-rise point, converging = first layer within 0.01 of the peak; relative = index / L.", ""]
    for model_dir in sorted(p for p in root.iterdir() if (p / "profile.json").is_file() and
                            not p.name.endswith("-robust")):
        prof = Profile.load(model_dir)
        meta = prof.meta.get("analyses", {}).get("concept_depth", {})
        name = prof.model.get("name")
        out += [f"## {name} ({prof.model['n_layers']} layers; site {meta.get('site')}, probe "
                f"{meta.get('probe', {})})", ""]
        out += task_table(prof) + [""]
        for key in ("converging_rel", "jump_rel"):
            lines, _ = family_ordering(prof, key)
            out += lines + [""]
        view = ConceptDepthView(prof)
        out += figure(view.plot("clean"), model_dir / "curves.png", f"{name} probe accuracy vs layer", root)
        out += figure(view.plot("clean", "selectivity"), model_dir / "selectivity.png", f"{name} selectivity vs layer",
                      root)
        robust = root / f"{model_dir.name}-robust"
        if (robust / "profile.json").is_file():
            rp = Profile.load(robust)
            rmeta = rp.meta.get("analyses", {}).get("concept_depth", {})
            out += [f"### {name}: robustness (noise = random-letter prefix; int8/int4 = lensbench packed weights "
                    f"via apply; probe {rmeta.get('probe', {})})", ""]
            out += robustness(rp) + [""]
            rview = ConceptDepthView(rp)
            for cond in rmeta.get("conditions", []):
                if cond == "clean":
                    continue
                out += figure(rview.plot(cond), robust / f"curves-{cond}.png", f"{name} {cond}", root)
    path = root.parent / "CONCEPT_DEPTH.md"
    write_text(path, "\n".join(out) + "\n")
    return path


if __name__ == "__main__":  # pragma: no cover
    print(f"wrote {write(Path(sys.argv[1] if len(sys.argv) > 1 else 'reports/concept-depth'))}")
