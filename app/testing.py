"""Serving the app in a thread and driving it with headless Chromium (tests and benchmarks/app.py)."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from lensbench.browser import CHROMIUM, DRIVER, chromium, console_errors  # noqa: F401  (re-exported)
from werkzeug.serving import make_server
from lensbench.agreement import refresh
from lensbench.profiles import Profile


@contextmanager
def serving(app, host: str = "127.0.0.1"):
    """Run the Dash app's WSGI server in a daemon thread on a free port; yields the base URL."""

    server = make_server(host, 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def open_dropdown(driver, dropdown_id: str, text: str, timeout: float = 10.0):
    """Open a dcc.Dropdown; returns its first option whose label contains `text`, once it is shown."""
    from selenium.webdriver.common.by import By  # optional: selenium (the dev extra), for the browser
    from selenium.webdriver.support.ui import WebDriverWait  # optional: selenium (the dev extra), for the browser

    driver.find_element(By.ID, dropdown_id).click()
    return WebDriverWait(driver, timeout, poll_frequency=0.01).until(
        lambda d: next((o for o in d.find_elements(By.CSS_SELECTOR, "[role='option']") if text in o.text), None))


REAL_PROFILES = ("plans-smollm2/profile", "channels-smollm2", "concept-depth/smollm2", "lrp-smollm2/profile",
                 "kv-smollm2/profile", "quant-db-smollm2/profile")


def workbench_profile(reports: Path, out: Path) -> Path:
    """Merge the SmolLM2 profiles committed under reports/ (all measured on the same weights) into one."""

    profile = Profile.load(reports / REAL_PROFILES[0])
    for rel in REAL_PROFILES[1:]:
        if (reports / rel / "profile.json").is_file():
            profile.merge(Profile.load(reports / rel))
    refresh(profile)  # the agreement matrix over every ranking merged in
    profile.save(out)
    return out
