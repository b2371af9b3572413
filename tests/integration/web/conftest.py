"""The dashboard in a real headless Chromium: a `Dashboard` that drives the page the way a
person does (forms, buttons, the nav bar) and screenshots each step into
test-artifacts/dashboard/, and one more when the test fails."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.integration.node.conftest import NodeLab
from tests.support.agent_lab import TEST_FAILED
from tests.support.browser import artifact_dir, chromium, console_errors

T = TypeVar("T")


class Dashboard:
    def __init__(self, driver: WebDriver, artifacts: Path, test_name: str) -> None:
        self.driver = driver
        self.artifacts = artifacts
        self.test_name = test_name
        self.url = ""

    def open(self, url: str) -> None:
        self.url = url
        self.driver.get(f"{url}/ui/")
        self.wait(lambda: self.visible("login-form") or self.visible("nav"), what="the page")

    def shot(self, step: str) -> Path:
        path = self.artifacts / f"{self.test_name}-{step}.png"
        self.driver.save_screenshot(str(path))
        return path

    def wait(self, check: Callable[[], T | None], *, timeout: float = 30, what: str) -> T:
        """Polls `check` until it returns something true (a stale element counts as not yet)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = check()
            except StaleElementReferenceException:
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.25)

    def find(self, css: str) -> WebElement | None:
        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def visible(self, element_id: str) -> bool:
        found = self.find(f"#{element_id}")
        return found is not None and found.is_displayed()

    def fill(self, css: str, text: str) -> None:
        field = self.driver.find_element(By.CSS_SELECTOR, css)
        field.clear()
        field.send_keys(text)

    def log_in(self, user: str, password: str) -> None:
        self.fill("#login-user", user)
        self.fill("#login-password", password)
        self.driver.find_element(By.CSS_SELECTOR, "#login-submit").click()

    def notice(self) -> str:
        box = self.find("#notice")
        return box.text if box is not None and box.is_displayed() else ""

    def go(self, view: str) -> None:
        """Clicks the nav bar's link to `view` and waits for its first table or line."""
        self.driver.find_element(By.CSS_SELECTOR, f'#nav a[data-view="{view}"]').click()
        self.wait(
            lambda: self.find(
                f'#view[data-view="{view}"] table, #view[data-view="{view}"] p.empty'
            ),
            what=f"the {view} page",
        )

    def row(self, holder: str, text: str) -> WebElement | None:
        """The row of table `holder` (an element id) that shows `text`, if any."""
        for row in self.driver.find_elements(By.CSS_SELECTOR, f"#{holder} tbody tr"):
            if text in row.text:
                return row
        return None

    def click_in_row(self, holder: str, text: str, css: str) -> None:
        """Clicks `css` in the row showing `text`, again if the live table was redrawn."""

        def clicked() -> bool:
            row = self.row(holder, text)
            if row is None:
                return False
            row.find_element(By.CSS_SELECTOR, css).click()
            return True

        self.wait(clicked, what=f"{css} in the row {text!r} of {holder}")

    def delete_row(self, holder: str, text: str, *, timeout: float = 60) -> None:
        """Clicks the row's danger button twice (it asks for a second click), again if the
        live table was redrawn in between, until the row is gone."""

        def gone() -> bool:
            row = self.row(holder, text)
            if row is None:
                return True
            armed = row.find_elements(By.CSS_SELECTOR, "button.confirming")
            button = armed[0] if armed else row.find_element(By.CSS_SELECTOR, "button.danger")
            button.click()
            return False

        self.wait(gone, timeout=timeout, what=f"the row {text!r} of {holder} to go")

    def session_stored(self) -> object:
        return self.driver.execute_script("return sessionStorage.getItem('nubes.session');")


@pytest.fixture
def dashboard(request: pytest.FixtureRequest) -> Iterator[Dashboard]:
    with chromium() as driver:
        page = Dashboard(
            driver, artifact_dir("dashboard"), request.node.name.removeprefix("test_")[:60]
        )
        try:
            yield page
        finally:
            if request.node.stash.get(TEST_FAILED, False):
                try:
                    page.shot("failure")
                    entries = driver.get_log("browser")  # type: ignore[no-untyped-call]
                    sys.stderr.write(f"--- browser console ---\n{entries}\n")
                except WebDriverException as error:
                    sys.stderr.write(f"no failure screenshot: {error}\n")
            else:
                assert console_errors(driver) == [], "the page threw errors"


@pytest.fixture
def node(request: pytest.FixtureRequest) -> Iterator[NodeLab]:
    """A real `nubes up` node (see tests/integration/node/conftest.py)."""
    lab = NodeLab()
    try:
        yield lab
    finally:
        if request.node.stash.get(TEST_FAILED, False):
            sys.stderr.write(f"--- node log ({lab.files.log}) ---\n{lab.log_text()[-8000:]}\n")
        lab.close()
