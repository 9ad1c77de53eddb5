"""The Dash workbench in a real headless Chromium, on real SmolLM2 profiles from reports/ (merged into
one), plus the static report and the command line."""
import json
from pathlib import Path

import pytest

from lensbench.app.testing import (CHROMIUM, DRIVER, REAL_PROFILES, chromium, console_errors, open_dropdown,
                                   serving, workbench_profile)
from lensbench.cli import build_parser, main

REPORTS = Path(__file__).resolve().parent.parent / "reports"
needs_browser = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                   reason="Chromium and chromedriver are not installed (.ci/run installs them)")
PAGES = {"/": "ov-strip-graph", "/redundancy": "rd-curve-fig", "/concept-depth": "cd-fig", "/channels": "ch-fig",
         "/relevance": "rl-run", "/plans": "pl-make", "/quant": "qt-linear-fig", "/kv": "kv-grid-fig"}


@pytest.fixture(scope="module")
def workbench(tmp_path_factory):
    """One SmolLM2 profile holding every analysis in reports/ (test_the_real_profiles_are_committed checks
    that none is missing)."""
    return workbench_profile(REPORTS, tmp_path_factory.mktemp("workbench"))


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(workbench, tmp_path_factory):
    from lensbench.app import create_app

    bad = tmp_path_factory.mktemp("bad")
    (bad / "profile.json").write_text('{"schema": "something-else", "model": {}}')
    with serving(create_app([workbench, bad])) as url:
        yield url


def wait_for(driver, id_, timeout=30):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(EC.presence_of_element_located((By.ID, id_)))


def wait_text(driver, id_, text, timeout=30):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.ID, id_).text)


def figure_title(driver, graph_id) -> str:
    return driver.execute_script(
        f"const g = document.getElementById('{graph_id}').querySelector('.js-plotly-plot');"
        "return g && g.layout && g.layout.title ? (g.layout.title.text || '') : '';")


@needs_browser
@pytest.mark.parametrize("path", list(PAGES))
def test_every_page_loads_without_console_errors(browser, served, path):
    browser.get(served + path)
    wait_for(browser, PAGES[path])
    assert "Traceback" not in browser.page_source
    assert console_errors(browser) == []


@needs_browser
def test_overview_ranking_choice_recolours_the_strip(browser, served):
    browser.get(served + "/")
    wait_for(browser, "ov-strip-graph")
    before = figure_title(browser, "ov-strip-graph")
    open_dropdown(browser, "ov-ranking", "ablation_kl_block").click()
    wait_text(browser, "ov-strip", "ablation_kl_block")
    assert figure_title(browser, "ov-strip-graph") != before
    wait_for(browser, "ov-agreement-graph")


@needs_browser
def test_redundancy_matrix_choice(browser, served):
    browser.get(served + "/redundancy")
    wait_for(browser, "rd-matrix-fig")
    open_dropdown(browser, "rd-matrix", "skip_effect").click()
    wait_text(browser, "rd-matrix-graph", "skip_effect")


@needs_browser
def test_concept_depth_metric_switch(browser, served):
    from selenium.webdriver.common.by import By

    browser.get(served + "/concept-depth")
    wait_for(browser, "cd-fig")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: "accuracy" in figure_title(d, "cd-fig"))  # plotly has drawn it
    browser.find_element(By.CSS_SELECTOR, "#cd-metric input[value='selectivity']").click()
    wait_text(browser, "cd-graph", "selectivity")
    wait_for(browser, "cd-depth-table")


@needs_browser
def test_channels_row_selection_shows_components(browser, served):
    from selenium.webdriver.common.by import By

    from selenium.webdriver.support.ui import WebDriverWait

    def detail(d):  # read in the page: the box is replaced when the selection changes
        return d.execute_script("const b = document.getElementById('ch-detail-box'); return b ? b.innerText : '';")

    browser.get(served + "/channels")
    wait_for(browser, "ch-detail-box")
    first = detail(browser)
    radios = browser.find_elements(By.CSS_SELECTOR, "#ch-edges input[type='radio']")
    radios[3].click()
    WebDriverWait(browser, 20).until(lambda d: detail(d) not in ("", first))
    text = detail(browser)
    assert "composition" in text and "σ =" in text
    wait_for(browser, "ch-detail-fig")  # the writer's and reader's spectra and the pair's components
    WebDriverWait(browser, 20).until(lambda d: "W_OV singular values" in d.find_element(By.ID, "ch-detail-fig").text)


@needs_browser
def test_foreign_profile_shows_a_message_not_a_trace(browser, served):
    browser.get(served + "/")
    wait_for(browser, "ov-strip-graph")
    open_dropdown(browser, "ov-profile", "cannot be opened").click()
    wait_text(browser, "ov-card", "cannot be opened")
    from selenium.webdriver.common.by import By

    assert "schema" in browser.find_element(By.ID, "ov-card").text
    assert "Traceback" not in browser.page_source


@needs_browser
@pytest.mark.real
def test_relevance_page_runs_dynamic_lrp_in_the_background(browser, served):
    from selenium.webdriver.common.by import By

    browser.get(served + "/relevance")
    wait_for(browser, "rl-run").click()
    wait_for(browser, "rl-tokens", timeout=240)
    assert "coverage 100.00%" in browser.find_element(By.ID, "rl-result").text
    assert console_errors(browser) == []


@needs_browser
@pytest.mark.real
def test_plan_explorer_makes_evaluates_saves_and_exports(browser, served):
    from selenium.webdriver.common.by import By

    browser.get(served + "/plans")
    wait_for(browser, "pl-make").click()
    wait_for(browser, "pl-plan-box")
    assert "removes:" in browser.find_element(By.ID, "pl-plan-box").text
    wait_for(browser, "pl-predicted-fig")  # the policy's predicted ladder, drawn at once
    browser.find_element(By.ID, "pl-eval").click()
    wait_for(browser, "pl-front-fig", timeout=420)
    assert "KL" in browser.find_element(By.ID, "pl-status").text
    browser.find_element(By.ID, "pl-save").click()  # the default format: a transformers checkpoint
    wait_for(browser, "pl-saved", timeout=240)
    text = browser.find_element(By.ID, "pl-saved").text
    assert "saved " in text and "loads in transformers" in text
    saved = Path(text.split("saved ", 1)[1].split(":", 1)[0])
    assert (saved / "config.json").is_file() and (saved / "lensbench-compress.json").is_file()
    assert console_errors(browser) == []


@needs_browser
@pytest.mark.real
def test_kv_page_shows_the_grid_and_searches_a_pareto_front(browser, served):
    from selenium.webdriver.common.by import By

    browser.get(served + "/kv")
    wait_for(browser, "kv-grid-fig")
    assert "KL" in figure_title(browser, "kv-grid-fig")
    assert "K8V4" in browser.find_element(By.ID, "kv-keys-table").text
    trials = browser.find_element(By.ID, "kv-trials")
    trials.clear()
    trials.send_keys("4")
    browser.find_element(By.ID, "kv-search").click()
    wait_for(browser, "kv-front-fig", timeout=420)
    assert "kv-tuner" in figure_title(browser, "kv-front-fig")
    assert "bits, calibration KL" in browser.find_element(By.ID, "kv-status").text
    assert console_errors(browser) == []


@needs_browser
def test_quant_page_level_and_score_switch(browser, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served + "/quant")
    wait_for(browser, "qt-linear-fig")
    wait_text(browser, "qt-ratios", "int2 / int3")
    assert "at int3" in figure_title(browser, "qt-linear-fig")
    browser.find_element(By.CSS_SELECTOR, "#qt-level input[value='2']").click()
    WebDriverWait(browser, 30).until(lambda d: "at int2" in figure_title(d, "qt-linear-fig"))
    browser.find_element(By.CSS_SELECTOR, "#qt-score input[value='hawq']").click()
    WebDriverWait(browser, 30).until(lambda d: "HAWQ" in figure_title(d, "qt-linear-fig"))
    assert "Calibration KL" in figure_title(browser, "qt-kl-fig")
    assert console_errors(browser) == []


def test_quant_figures_from_the_real_database(workbench):
    """The committed SmolLM2 database (group 128 asym, levels 2/3/4/8, searched group ranges): GPTQ's error
    grows by about BAQ's 4x model per bit removed, less than that from int3 to int2, where the range search
    gains most (on min-max ranges that step cost more than 5x)."""
    from lensbench.app.pages.quant import block_figure, levels, linear_figure, ratio_rows
    from lensbench.profiles import Profile

    profile = Profile.load(workbench)
    assert levels(profile) == [2, 3, 4, 8]
    fig = linear_figure(profile, "gptq_nmse", 3)
    assert len(fig.data[0].z) == 30 and list(fig.data[0].x)[0].endswith("q_proj")
    assert [t.name for t in block_figure(profile, "hawq").data] == ["int2", "int3", "int4", "int8"]
    ratios = {r["levels"]: r["median"] for r in ratio_rows(profile)}
    assert 3 < ratios["int2 / int3"] < ratios["int3 / int4"] < 4.5


def test_quant_study_from_the_committed_gemma_run():
    """reports/quant-db-gemma3/study.json (benchmarks/quant_study.py on Gemma-3-270M at 2.5, 3, 3.5, 4 and 4.25
    bits; at 3 and 3.5 the uniform row is every block at int3, at 4 and 4.25 every block at int4): one line per
    method, each uniform one flat across its two budgets, and the page finds the file beside the profile folder."""
    from lensbench.app.pages.quant import study_figure, study_file, study_table
    from lensbench.jsonio import read

    path = REPORTS / "quant-db-gemma3" / "profile"
    assert study_file(str(path)) == path.parent / "study.json"
    assert study_file(str(path / "profile.json")) == path.parent / "study.json"
    doc = read(study_file(str(path)))
    fig = study_figure(doc)
    for level in ("int3", "int4"):
        uniform = next(t for t in fig.data if t.name.startswith(f"uniform {level}"))
        assert list(uniform.y) == [uniform.y[0]] * 2
    assert len(fig.data) >= 4
    assert len(study_table(doc).children) == len(doc["rows"]) + 1


@needs_browser
def test_quant_page_draws_the_study_beside_a_database(browser):
    from lensbench.app import create_app

    with serving(create_app([REPORTS / "quant-db-gemma3" / "profile"])) as url:
        browser.get(url + "/quant")
        wait_for(browser, "qt-study-fig")
        assert "gemma3-270m" in figure_title(browser, "qt-study-fig")
        wait_for(browser, "qt-linear-fig")
        assert console_errors(browser) == []


def test_kv_figures_from_the_real_profile(workbench):
    from lensbench.app.pages.kv import front_figure, grid_figure
    from lensbench.profiles import Profile

    profile = Profile.load(workbench)
    fig = grid_figure(profile, "kv_kl")
    assert list(fig.data[0].x)[:2] == ["KV8", "K8V4"] and len(fig.data[0].z) == 30
    meta = {"pareto_front": [{"kv_bits": 3.0, "calibration_kl": 0.3, "pairs": ["K4V2"]},
                             {"kv_bits": 4.0, "calibration_kl": 0.1, "pairs": ["KV4"]}],
            "uniform": {"KV4": {"kv_bits": 4.0, "calibration_kl": 0.1}}}
    fig = front_figure(meta, {"kv_bits": 4.0, "calibration_kl": 0.1})
    assert [t.name for t in fig.data] == ["Pareto front (searched)", "uniform pairs", "plan"]


def test_predicted_plan_quality_is_the_sum_of_single_unit_ablation_kls(workbench):
    from lensbench.app.pages.plans import LADDER, predicted_figure, predicted_kl
    from lensbench.compress.policies import make_plan
    from lensbench.profiles import Profile

    profile = Profile.load(workbench)
    plan = make_plan("drop-attn", profile, 3)
    kl = profile.scores["ablation_kl_attn"].values
    assert predicted_kl(profile, plan) == pytest.approx(sum(kl[u.layer] for u in plan.units()))
    fig = predicted_figure(profile, "drop-block")
    assert len(fig.data[0].x) == LADDER and list(fig.data[0].y) == sorted(fig.data[0].y)  # more removed, more KL
    assert predicted_figure(profile, "bits-rank") is None  # quantisation plans are measured, not predicted here
    del profile.scores["ablation_kl_block"]
    assert predicted_figure(profile, "drop-block") is None


def test_the_real_profiles_are_committed():
    assert [p for p in REAL_PROFILES if not (REPORTS / p / "profile.json").is_file()] == []


def test_report_is_self_contained(tmp_path, workbench, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(workbench), "--out", str(out)]) == 0
    html = out.read_text()
    assert "<script src=" not in html and "Plotly" in html
    for section in ("Overview", "Redundancy &amp; sensitivity", "Concept depth", "Channels", "Relevance"):
        assert section in html


def test_report_of_a_foreign_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "profile.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["report", str(bad), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a lensbench profile" in err


def test_app_binds_localhost_by_default_and_needs_a_profile(capsys):
    args = build_parser().parse_args(["app", "x"])
    assert args.host == "127.0.0.1"
    assert main(["app"]) == 2
    assert "no profile" in capsys.readouterr().err


def test_state_memo_reuses_and_bounds_derived_values():
    from lensbench.app.state import State

    state, built = State([]), []
    state.memo_size = 2

    def build(name):
        built.append(name)
        return {"figure": name}

    first = state.memo(("fig", "a"), lambda: build("a"))
    assert state.memo(("fig", "a"), lambda: build("a")) is first and built == ["a"]
    state.memo(("fig", "b"), lambda: build("b"))
    state.memo(("fig", "a"), lambda: build("a"))  # a is now the most recent
    state.memo(("fig", "c"), lambda: build("c"))  # evicts b, the least recently used
    state.memo(("fig", "a"), lambda: build("a"))
    state.memo(("fig", "b"), lambda: build("b"))
    assert built == ["a", "b", "c", "b"]


def test_the_app_draws_only_trace_types_the_partial_plotly_bundle_has():
    import re

    from lensbench.app.plotly_bundle import TRACES

    root = Path(__file__).resolve().parent.parent
    used = {m.lower() for d in ("app", "analyses", "probes", "lensbench") for f in (root / d).rglob("*.py")
            for m in re.findall(r"\bgo\.([A-Z][A-Za-z]+)\(", f.read_text())} - {"figure"}
    assert used and used <= TRACES, used - TRACES


def test_plotly_bundle_fetch_checks_the_pinned_digest(tmp_path, monkeypatch):
    import base64
    import hashlib
    import io
    import tarfile

    from lensbench.app import plotly_bundle

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        body = b"window.Plotly = {};"
        info = tarfile.TarInfo(plotly_bundle.FILE)
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    data = buf.getvalue()

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(plotly_bundle.urllib.request, "urlopen", lambda url, timeout: Response(data))
    version = plotly_bundle.version()
    with pytest.raises(RuntimeError, match="does not match its pinned sha512"):
        plotly_bundle.fetch()
    assert plotly_bundle.available() is None
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    monkeypatch.setitem(plotly_bundle.PINNED, version, digest)
    assert plotly_bundle.fetch().read_bytes() == body and plotly_bundle.available() is not None
    monkeypatch.delitem(plotly_bundle.PINNED, version)
    with pytest.raises(RuntimeError, match="no pinned cartesian bundle"):
        plotly_bundle.fetch()


@needs_browser
def test_pages_use_the_partial_plotly_bundle_when_fetched(browser, served):
    from lensbench.app import plotly_bundle

    if plotly_bundle.available() is None:
        pytest.skip("plotly.js's cartesian bundle is not fetched (./run fetches it; offline the full bundle is used)")
    browser.get(served + "/redundancy")
    wait_for(browser, "rd-matrix-fig")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: figure_title(d, "rd-matrix-fig"))  # plotly has drawn it
    assert browser.execute_script("return window.Plotly.version") == plotly_bundle.version()
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any("plotly-cartesian" in u for u in loaded)
    assert not any("package_data/plotly.min.js" in u for u in loaded)  # the full bundle was never fetched
