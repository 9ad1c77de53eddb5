"""The system's headless Chromium (Debian `chromium` + `chromium-driver`): the app's browser tests and
benchmark drive it, and it renders plotly figures to PNG for the reports (no kaleido needed)."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
                 if Path(p).exists()), None)
DRIVER = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver",) if Path(p).exists()), None)


def chromium(width: int = 1400, height: int = 1000):
    """A headless Chromium WebDriver with the browser console log enabled."""
    from selenium import webdriver  # optional: selenium (the dev extra), for the browser
    from selenium.webdriver.chrome.service import Service  # optional: selenium (the dev extra), for the browser

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def render_png(fig, path: Path) -> bool:
    """Screenshot a plotly figure with headless Chromium; False when no browser is installed."""
    if CHROMIUM is None or DRIVER is None:
        return False
    width, height = int(fig.layout.width or 1200), int(fig.layout.height or 450)
    with tempfile.NamedTemporaryFile("w", suffix=".html", delete=False) as fh:
        fh.write(fig.to_html(include_plotlyjs=True, full_html=True, config={"staticPlot": True}))
    driver = chromium(width + 40, height + 160)
    try:
        driver.get(f"file://{fh.name}")
        time.sleep(1.0)
        driver.find_element("css selector", ".js-plotly-plot").screenshot(str(path))
    finally:
        driver.quit()
        Path(fh.name).unlink(missing_ok=True)
    return True
