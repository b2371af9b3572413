"""A real headless Chromium for the dashboard tests: Debian's browser and chromedriver
(named explicitly, so Selenium Manager never reaches for the network), a throwaway
profile, a 1280x800 window, screenshots under test-artifacts/. On the way out the
driver quits and any browser process of this profile that is left is killed by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
WIDTH, HEIGHT = 1280, 800


def artifact_dir(name: str) -> Path:
    directory = ARTIFACTS / name
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _processes_of(profile: str) -> list[int]:
    """PIDs of processes whose command line names `profile` (our browser's only)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if f"--user-data-dir={profile}".encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
    return found


@contextmanager
def chromium() -> Iterator[WebDriver]:
    """A headless Chromium at 1280x800 with its console log kept."""
    profile = tempfile.mkdtemp(prefix="nb-chromium-", dir="/tmp")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        "--force-device-scale-factor=1",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
    driver: WebDriver | None = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        # The window holds more than the page (even headless): size it so the page
        # itself, and so every screenshot, is 1280x800.
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight];")
        driver.set_window_size(2 * WIDTH - inner[0], 2 * HEIGHT - inner[1])
        yield driver
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        with contextlib.suppress(Exception):
            service.stop()
        deadline = time.monotonic() + 5
        while _processes_of(profile) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _processes_of(profile):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: WebDriver) -> list[str]:
    """The page's uncaught errors so far (failed requests the page handled are not)."""
    entries: list[dict[str, object]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    messages = [str(entry.get("message", "")) for entry in entries]
    return [m for m in messages if "Uncaught" in m or "SyntaxError" in m or "TypeError" in m]
