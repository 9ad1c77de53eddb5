"""The app in a real headless Chromium on the 30-layer SmolLM2 profile (every analysis in reports/
merged): first paint of each page and one callback round trip per page, measured in the browser,
and a screenshot of every page into reports/screenshots/.

First paint: from navigation until the page's main figure (or control) is in the DOM and, for
figures, plotly has drawn it. Round trip: from the interaction until the DOM shows its result
(Selenium polls every 10 ms, so times include up to 10 ms of polling). Goals (issue 8): first paint
≤ 2 s, round trips ≤ 300 ms. Rounds are interleaved over pages.

Usage: python benchmarks/app.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, machine, versions  # noqa: E402

from lensbench.app import create_app  # noqa: E402
from lensbench.app.testing import chromium, console_errors, serving, workbench_profile  # noqa: E402

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


def title(driver, graph_id: str) -> str:
    return driver.execute_script(
        f"const g = document.getElementById('{graph_id}').querySelector('.js-plotly-plot');"
        "return g && g.layout && g.layout.title ? (g.layout.title.text || '') : '';") or ""


def click_option(driver, dropdown_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, dropdown_id).click()
    wait(lambda: any(text in o.text for o in driver.find_elements(By.CSS_SELECTOR, "[role='option']")), 10)
    next(o for o in driver.find_elements(By.CSS_SELECTOR, "[role='option']") if text in o.text).click()


def interactions(driver):
    """page path -> (main element id, is a figure, interaction function returning its round-trip seconds)."""
    from selenium.webdriver.common.by import By

    def overview():
        current = title(driver, "ov-strip-graph")
        choice = "ablation_kl_block" if "ablation_kl_block" not in current else "block_cosine"
        t0 = time.perf_counter()
        click_option(driver, "ov-ranking", choice)
        wait(lambda: choice in title(driver, "ov-strip-graph"))
        return time.perf_counter() - t0

    def redundancy():
        current = title(driver, "rd-matrix-fig")
        choice = "skip_effect_mean" if "skip_effect_mean" not in current else "cka"
        t0 = time.perf_counter()
        click_option(driver, "rd-matrix", choice)
        wait(lambda: present(driver, "rd-matrix-fig") and choice in title(driver, "rd-matrix-fig"))
        return time.perf_counter() - t0

    def concept():
        t0 = time.perf_counter()
        driver.find_element(By.CSS_SELECTOR, "#cd-metric input[value='selectivity']").click()
        wait(lambda: present(driver, "cd-fig") and "selectivity" in title(driver, "cd-fig"))
        return time.perf_counter() - t0

    def channels():
        first = driver.find_element(By.ID, "ch-detail-box").text
        t0 = time.perf_counter()
        driver.find_elements(By.CSS_SELECTOR, "#ch-edges input[type='radio']")[2].click()
        wait(lambda: present(driver, "ch-detail-box") and driver.find_element(By.ID, "ch-detail-box").text != first)
        return time.perf_counter() - t0

    def plans():
        t0 = time.perf_counter()
        driver.find_element(By.ID, "pl-make").click()
        wait(lambda: present(driver, "pl-plan-box"))
        return time.perf_counter() - t0

    return {"/": ("ov-strip-graph", True, overview), "/redundancy": ("rd-matrix-fig", True, redundancy),
            "/concept-depth": ("cd-fig", True, concept), "/channels": ("ch-fig", True, channels),
            "/relevance": ("rl-run", False, None), "/plans": ("pl-make", False, plans)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    prof = workbench_profile(REPORTS, Path(tempfile.mkdtemp(prefix="lensbench-app-")))
    SHOTS.mkdir(parents=True, exist_ok=True)
    paint: dict[str, list[float]] = {}
    trip: dict[str, list[float]] = {}
    errors: list[str] = []
    with serving(create_app([prof])) as url:
        driver = chromium(1500, 1800)
        pages = interactions(driver)
        for r in range(args.rounds):
            for path, (main_id, is_fig, act) in pages.items():
                t0 = time.perf_counter()
                driver.get(url + path)
                wait(lambda m=main_id, f=is_fig: drawn(driver, m) if f else present(driver, m))
                paint.setdefault(path, []).append(time.perf_counter() - t0)
                if act is not None:
                    time.sleep(0.3)  # let the page's other initial callbacks settle
                    trip.setdefault(path, []).append(act())
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
             "| page | first paint median s | max s | round trip median ms | max ms |", "|---|---|---|---|---|"]
    for path in pages:
        p, t = paint[path], trip.get(path)
        lines.append(f"| {path} | {statistics.median(p):.2f} | {max(p):.2f} | "
                     + (f"{1000 * statistics.median(t):.0f} | {1000 * max(t):.0f} |" if t else "— | — |"))
    lines += ["", f"Console errors: {len(errors)}." + (f" First: {errors[0][:200]}" if errors else "")]
    print("\n".join(lines))
    append_report("App in headless Chromium (first paint, callback round trips)", "\n".join(lines))


if __name__ == "__main__":
    main()
