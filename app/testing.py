"""Serving the app in a thread and driving it with headless Chromium (tests and benchmarks/app.py)."""
from __future__ import annotations

import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
                 if Path(p).exists()), None)
DRIVER = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver",) if Path(p).exists()), None)


@contextmanager
def serving(app, host: str = "127.0.0.1"):
    """Run the Dash app's WSGI server in a daemon thread on a free port; yields the base URL."""
    from werkzeug.serving import make_server

    server = make_server(host, 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def chromium(width: int = 1400, height: int = 1000):
    """A headless Chromium WebDriver with the browser console log enabled."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


REAL_PROFILES = ("plans-smollm2/profile", "channels-smollm2", "concept-depth/smollm2", "lrp-smollm2/profile")


def workbench_profile(reports: Path, out: Path) -> Path:
    """Merge the SmolLM2 profiles committed under reports/ (all measured on the same weights) into one."""
    from lensbench.analyses.agreement import refresh
    from lensbench.profile import Profile

    profile = Profile.load(reports / REAL_PROFILES[0])
    for rel in REAL_PROFILES[1:]:
        if (reports / rel / "profile.json").is_file():
            profile.merge(Profile.load(reports / rel))
    refresh(profile)  # the agreement matrix over every ranking merged in
    profile.save(out)
    return out
