"""The browser tier: the dashboard in a real headless Chromium (Debian's ``chromium``)
driven by Playwright, against real services. Skipped, saying why, where there is no
Chromium or no Playwright, unless ``POPE_REQUIRE_BROWSER=1`` (CI sets it once it has
installed Chromium): then that is a failure. `make browser-test` installs Chromium and runs
the tier.

Screenshots go to ``$POPE_TEST_ARTIFACTS`` (default ``runs/test-artifacts``)/dashboard/.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # the tests run as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # a closed network refuses Chromium's own connections
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    return os.environ.get("POPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    out = Path(os.environ.get("POPE_TEST_ARTIFACTS", ROOT / "runs" / "test-artifacts")) / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")  # not the session's: Playwright's sync API holds an event loop
def browser() -> Iterator[Any]:  # on this thread while it runs, which async tests after it cannot share
    executable = chromium_path()
    required = os.environ.get("POPE_REQUIRE_BROWSER") == "1"  # CI sets it once Chromium is installed
    if executable is None:
        why = "no Chromium on PATH (apt-get install chromium; `make browser-test` does)"
        pytest.fail(why) if required else pytest.skip(why)
    try:
        from playwright import sync_api
    except ImportError:
        why = "no Playwright (the test extra: pip install -e '.[test]')"
        pytest.fail(why) if required else pytest.skip(why)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class PageWatch:
    """A page with everything it said and did that a test checks afterwards: console
    errors, uncaught exceptions, dialogs, and the URLs it requested."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[Any] = []
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("dialog", self._dialog)
        page.on("request", lambda r: self.requests.append(r))

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()


@pytest.fixture
def watched(browser: Any) -> Iterator[PageWatch]:
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    try:
        yield PageWatch(context.new_page())
    finally:
        context.close()
