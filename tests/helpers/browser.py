"""A real headless Chromium for page tests (Debian's ``chromium`` + ``chromium-driver``).

:func:`headless_chromium` skips the calling test, saying why, when Selenium or the
browser is missing (``.ci/run`` installs both; locally: ``apt-get install -y chromium
chromium-driver`` and ``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "chromium-driver")


def require_browser() -> tuple[str, str]:
    """Paths of the Chromium binary and its driver; skips the test (with the reason) when
    Selenium or either binary is missing. Call it before any expensive setup."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = next((shutil.which(d) for d in DRIVERS if shutil.which(d)), None)
    if browser is None or driver is None:
        pytest.skip(
            "no headless browser: install Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver), as .ci/run does"
        )
    return browser, driver


@contextmanager
def headless_chromium(tmp: Path, width: int = 1400, height: int = 1800) -> Iterator:
    """A Selenium Chrome driver on headless Chromium with the browser log enabled.

    Everything the browser writes stays under ``tmp`` (a folder of pytest's temporary
    tree): its profile (``--user-data-dir``) and its scratch files (``TMPDIR`` of the
    driver, which the browser inherits); without them it left
    ``/tmp/org.chromium.Chromium.*`` behind. ``tmp`` must be a short path
    (``tmp_path_factory.mktemp("chromium")``, not a long test's ``tmp_path``): Chromium
    puts a Unix socket at ``$TMPDIR/org.chromium.Chromium.XXXXXX/SingletonSocket``, and a
    socket path over 107 bytes makes the browser exit at start.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = require_browser()
    profile, scratch = Path(tmp) / "profile", Path(tmp) / "t"
    socket = scratch / "org.chromium.Chromium.XXXXXX" / "SingletonSocket"
    if len(os.fsencode(socket)) > 107:
        raise ValueError(f"{tmp}: too long for Chromium's socket ({socket}); pass a shorter one")
    profile.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    opts = Options()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    env = {**os.environ, "TMPDIR": str(scratch), "TMP": str(scratch), "TEMP": str(scratch)}
    drv = webdriver.Chrome(service=Service(driver, env=env), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def severe_logs(driver) -> list[dict]:
    """Browser console entries of level SEVERE (errors) since the last call."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
