"""Headless Chromium (Debian's `chromium` and `chromium-driver`) driven through selenium, for the fleet page's browser
test (tests/test_fleet_page_browser.py) and its timing (bench/fleet_page.py).

The browser is Debian's, not one selenium downloads: the paths are given, so selenium's own driver manager, which
would go to the network, never runs. `.ci/run` installs both packages; on a machine without them the test skips
with the command that installs them, unless LORA_CONVERT_REQUIRE_BROWSER is set (CI), when it fails instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = os.environ.get("LORA_CONVERT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LORA_CONVERT_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"
REQUIRE = "LORA_CONVERT_REQUIRE_BROWSER"
# Headless as root on a machine with no display and a closed network: no sandbox (root), no GPU, and none of the
# background connections (updates, sync, QUIC) that a closed network refuses at every start.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


def missing() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    absent = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        absent.append("the selenium package (the [test] extra: `make setup`)")
    if not absent:
        return None
    return f"not installed: {', '.join(absent)}; install Debian's Chromium and its driver as root: `{INSTALL}`"


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator:
    """A selenium WebDriver on a fresh headless Chromium profile (removed afterwards), with the browser console
    log kept (`driver.get_log("browser")`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lora-convert-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def file_url(path: Path) -> str:
    return Path(path).resolve().as_uri()
