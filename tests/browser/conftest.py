"""Browser-test fixtures: one real stack and one headless Chromium for this package, a logged-in page per test."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import ROOT, Stack, start_stack

CHROMIUM = os.environ.get("KD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
SCREENSHOTS = ROOT / "test-output" / "screenshots"
USERNAME, PASSWORD = "browser-alice", "pw-browser-alice-42"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def _skip_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium); browser tests skipped"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed; browser tests skipped"
    if not (ROOT / "node_modules" / "uplot" / "dist" / "uPlot.esm.js").exists():
        return "node_modules/uplot is missing (run `npm ci`); browser tests skipped"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.browser)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # The page fixture reads this to save a screenshot of a failing test.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("browser-stack"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="package")
def token(stack: Stack) -> str:
    return stack.make_user(USERNAME, PASSWORD)


@pytest.fixture(scope="package")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="package")
def auth_state(stack: Stack, token: str, browser, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Log in once through the real form; tests reuse the session cookie."""
    ctx = browser.new_context(viewport=DESKTOP)
    page = ctx.new_page()
    login(page, stack.url)
    path = str(tmp_path_factory.mktemp("auth") / "state.json")
    ctx.storage_state(path=path)
    ctx.close()
    return path


def login(page, base_url: str, username: str = USERNAME, password: str = PASSWORD) -> None:
    page.goto(base_url + "/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("#login-btn")
    page.wait_for_url(re.compile(r".*/(experiments/)?$"))


@pytest.fixture
def page(request: pytest.FixtureRequest, browser, auth_state: str, stack: Stack) -> Iterator:
    ctx = browser.new_context(viewport=DESKTOP, storage_state=auth_state, accept_downloads=True)
    ctx.set_default_timeout(20_000)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # A console error is a failed request (a missing static file, an API 5xx) or a script error.
    pg.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    pg.js_errors = errors
    try:
        yield pg
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid.split("::")[-1])
            try:
                pg.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
            except Exception as e:  # a crashed page still lets the test report its own failure
                print(f"screenshot failed: {e}")
        ctx.close()


@pytest.fixture(scope="package")
def shots_dir() -> Path:
    d = ROOT / "test-output" / "screenshots" / "pages"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    return d
