"""The app in a real headless Chromium on the 30-layer SmolLM2 profile (every analysis in reports/
merged): first paint of each page and one callback round trip per page, measured in the browser,
and a screenshot of every page into reports/screenshots/.

First paint: from navigation until the page's main figure (or control) is in the DOM and, for
figures, plotly has drawn it (timed from Python; Selenium polls every 10 ms). Round trip: the click
that fires the callback is dispatched inside the page, and the page's own clock (performance.now)
stops at the first animation frame where the result is on screen (a figure's drawn title, a box's
text): request, server callback, response, React update and plotly drawing. The "with WebDriver"
column times the whole interaction from Python instead, including WebDriver opening a dropdown and
its command latency, which a user's click does not pay. Goals (issue 8): first paint ≤ 2 s, round
trips ≤ 300 ms. Rounds are interleaved over pages. A fresh browser's first visit (empty cache) is
timed separately, with plotly.js's cartesian bundle (when `./run` has fetched it) and with the full
bundle, interleaved.

Usage: python benchmarks/app.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, machine, versions  # noqa: E402

from lensbench.app import create_app  # noqa: E402
from lensbench.app.testing import chromium, console_errors, open_dropdown, serving, workbench_profile  # noqa: E402

warnings.filterwarnings("ignore")
REPORTS = Path(__file__).resolve().parent.parent / "reports"
SHOTS = REPORTS / "screenshots"


def drawn(driver, graph_id: str) -> bool:
    return bool(driver.execute_script(
        f"const e = document.getElementById('{graph_id}');"
        "const g = e && e.querySelector('.js-plotly-plot');"
        "return !!(g && g._fullLayout && g.querySelector('.main-svg'));"))


def present(driver, id_: str) -> bool:
    return bool(driver.execute_script(f"return !!document.getElementById('{id_}');"))


def wait(cond, timeout=60.0, poll=0.01):
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("timed out")
        time.sleep(poll)
    return time.perf_counter() - t0


TRIGGER = """
const [selector, text, index, condition, done] = arguments;
const hits = Array.from(document.querySelectorAll(selector))
  .filter(e => !text || e.textContent.includes(text) || e.value === text);
const el = hits[index];
if (!el) { done(-1); return; }
const ready = new Function(condition);
const t0 = performance.now();
el.click();
(function poll() { if (ready()) done(performance.now() - t0); else requestAnimationFrame(poll); })();
"""


def trip(driver, selector: str, condition: str, text: str = "", index: int = 0) -> float:
    """Seconds from a click dispatched in the page on `selector` (the `index`-th match containing `text`)
    to the first animation frame where the JS `condition` holds, timed with the page's own clock."""
    ms = driver.execute_async_script(TRIGGER, selector, text, index, condition)
    if ms < 0:
        raise RuntimeError(f"no element {selector} {text!r} [{index}] on the page")
    return ms / 1000


def title_has(graph_id: str, text: str) -> str:
    """JS condition: the drawn title of the plotly figure in `graph_id` contains `text`."""
    return (f"const t = document.querySelector({json.dumps('#' + graph_id + ' .gtitle')});"
            f"return !!t && t.textContent.includes({json.dumps(text)});")


def title(driver, graph_id: str) -> str:
    return driver.execute_script(
        f"const t = document.querySelector({json.dumps('#' + graph_id + ' .gtitle')});"
        "return t ? t.textContent : '';") or ""


def interactions(driver):
    """page path -> (main element id, is a figure, interaction returning (round trip in the page,
    seconds including WebDriver's own steps such as opening a dropdown))."""

    def choose(dropdown_id, graph_id, a, b):
        choice = b if a in title(driver, graph_id) else a
        t0 = time.perf_counter()
        open_dropdown(driver, dropdown_id, choice)
        rt = trip(driver, "[role='option']", title_has(graph_id, choice), text=choice)
        return rt, time.perf_counter() - t0

    def concept():
        t0 = time.perf_counter()
        rt = trip(driver, "#cd-metric input", title_has("cd-fig", "selectivity"), text="selectivity")
        return rt, time.perf_counter() - t0

    def channels():
        cells = driver.execute_script(
            "return Array.from(document.querySelectorAll('#ch-edges tr')[3].querySelectorAll('td'))"
            ".map(c => c.innerText.trim());")  # the third edge: [radio, mode, writer, component, reader, ...]
        expected = f"writer {cells[2]}, reader {cells[4]}"
        t0 = time.perf_counter()
        rt = trip(driver, "#ch-edges input[type='radio']", index=2, condition=(
            "return Array.from(document.querySelectorAll('#ch-detail-fig .annotation-text'))"
            f".some(t => t.textContent.includes({json.dumps(expected)}));"))
        return rt, time.perf_counter() - t0

    def plans():
        t0 = time.perf_counter()
        rt = trip(driver, "#pl-make", "return !!document.getElementById('pl-plan-box');")
        return rt, time.perf_counter() - t0

    return {"/": ("ov-strip-graph", True, lambda: choose("ov-ranking", "ov-strip-graph",
                                                         "ablation_kl_block", "block_cosine")),
            "/redundancy": ("rd-matrix-fig", True, lambda: choose("rd-matrix", "rd-matrix-fig",
                                                                  "skip_effect_mean", "cka")),
            "/concept-depth": ("cd-fig", True, concept), "/channels": ("ch-fig", True, channels),
            "/relevance": ("rl-run", False, None), "/plans": ("pl-make", False, plans)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cold", type=int, default=3, help="fresh browsers timed on their first visit")
    args = ap.parse_args(argv)
    prof = workbench_profile(REPORTS, Path(tempfile.mkdtemp(prefix="lensbench-app-")))
    SHOTS.mkdir(parents=True, exist_ok=True)
    paint: dict[str, list[float]] = {}
    trips: dict[str, list[float]] = {}
    totals: dict[str, list[float]] = {}
    errors: list[str] = []
    app = create_app([prof])
    # a fresh browser's first visit, interleaved with the same app loading plotly's full bundle
    full_app = create_app([prof], partial_plotly=False)
    variants = {a.lensbench_plotly: a for a in (full_app, app)}  # one entry when the partial bundle is absent
    cold: dict[str, list[float]] = {name: [] for name in variants}
    with contextlib.ExitStack() as servers:
        urls = {name: servers.enter_context(serving(a)) for name, a in variants.items()}
        for i in range(args.cold + 1):  # + 1: the servers' own first requests are not counted
            for name, base in urls.items():
                fresh = chromium(1500, 1800)
                t0 = time.perf_counter()
                fresh.get(base + "/")
                wait(lambda b=fresh: drawn(b, "ov-strip-graph"))
                if i:
                    cold[name].append(time.perf_counter() - t0)
                fresh.quit()
        url = urls[app.lensbench_plotly]
        driver = chromium(1500, 1800)
        driver.set_script_timeout(60)
        driver.get(url + "/")  # this browser's own cold visit (measured above on fresh browsers)
        wait(lambda: drawn(driver, "ov-strip-graph"))
        pages = interactions(driver)
        for r in range(args.rounds):
            for path, (main_id, is_fig, act) in pages.items():
                t0 = time.perf_counter()
                driver.get(url + path)
                wait(lambda m=main_id, f=is_fig: drawn(driver, m) if f else present(driver, m))
                paint.setdefault(path, []).append(time.perf_counter() - t0)
                if act is not None:
                    time.sleep(0.3)  # let the page's other initial callbacks settle
                    rt, total = act()
                    trips.setdefault(path, []).append(rt)
                    totals.setdefault(path, []).append(total)
                errors += console_errors(driver)
                if r == 0:
                    time.sleep(0.5)
                    name = path.strip("/") or "overview"
                    driver.save_screenshot(str(SHOTS / f"{name}.png"))
        # the relevance page after a real DynamicLRP run (model load + attribution: not a round trip)
        from selenium.webdriver.common.by import By

        driver.get(url + "/relevance")
        wait(lambda: present(driver, "rl-run"))
        driver.find_element(By.ID, "rl-run").click()
        wait(lambda: drawn(driver, "rl-layers"), timeout=300)
        time.sleep(0.5)
        driver.save_screenshot(str(SHOTS / "relevance.png"))
        driver.quit()
    lines = [f"Machine: {machine()}. Versions: {versions('dash', 'plotly', 'selenium')}; Chromium headless. "
             f"{args.rounds} rounds over the pages; profile: SmolLM2-135M, 30 layers, every analysis.", "",
             "First visit in a fresh browser profile (empty cache: plotly.js is compiled for the first time), "
             "overview page: " + "; ".join(f"{name}: median {statistics.median(c):.2f} s, min {min(c):.2f} s"
                                           for name, c in cold.items())
             + f" ({args.cold} browsers each, interleaved). The table below uses the {app.lensbench_plotly}; its "
             "first paints are later visits (the browser has the scripts cached).", "",
             "| page | first paint median s | max s | round trip in the page median ms | max ms "
             "| with WebDriver median ms |", "|---|---|---|---|---|---|"]
    for path in pages:
        p, t, w = paint[path], trips.get(path), totals.get(path)
        lines.append(f"| {path} | {statistics.median(p):.2f} | {max(p):.2f} | "
                     + (f"{1000 * statistics.median(t):.0f} | {1000 * max(t):.0f} | {1000 * statistics.median(w):.0f} |"
                        if t else "— | — | — |"))
    lines += ["", f"Console errors: {len(errors)}." + (f" First: {errors[0][:200]}" if errors else "")]
    print("\n".join(lines))
    append_report("App in headless Chromium (first paint, callback round trips)", "\n".join(lines))


if __name__ == "__main__":
    main()
