"""The web inbox in a real browser: Debian's chromium, headless, driven by Playwright, against
a real `tether serve` running the refund example.

No browser is downloaded: Playwright launches /usr/bin/chromium (`$TETHER_CHROMIUM`
overrides; `make test` installs Debian's package when it is missing). Without it these
tests skip with a message, except under CI=true, where they fail.

Screenshots of the inbox, the timeline and the graph are written to `$TETHER_SCREENSHOTS`
when set (docs/screenshots/ is made that way), else to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from web_server import WebServer, start

CHROMIUM = Path(os.environ.get("TETHER_CHROMIUM", "/usr/bin/chromium"))


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        return f"no chromium at {CHROMIUM} (apt-get install chromium; make test does it)"
    return None


def _needed() -> None:
    missing = _missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser tests must run under CI: {missing}")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    _needed()  # before starting anything
    running = start(tmp_path_factory.mktemp("web-browser"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser(server: WebServer) -> Iterator[Any]:
    """Started after the server: the server's setup runs its own event loop, which it could
    not while Playwright's is running."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TETHER_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def paused_run(server: WebServer) -> tuple[str, str]:
    run_id = server.submit()
    server.wait_for(run_id, "paused")
    headers = {"Authorization": f"Bearer {server.tokens['admin']}"}
    run = httpx.get(f"{server.url}/api/v1/runs/{run_id}", headers=headers).json()["run"]
    return run_id, run["ticket_id"]


def sign_in(page: Any, server: WebServer, who: str) -> None:
    """From the keyboard: the token field has the focus; Enter submits."""
    page.goto(f"{server.url}/inbox")
    assert page.url.startswith(f"{server.url}/login")
    # The field takes the focus once the page has loaded: keys typed before would be lost
    # (seen on a loaded machine: the empty, required field was never submitted).
    page.locator("#token:focus").wait_for()
    page.keyboard.type(server.tokens[who])
    page.keyboard.press("Enter")
    page.wait_for_url(f"{server.url}/inbox")


def test_edit_and_approve_then_watch_the_run_complete_live(
    browser: Any, server: WebServer, shots: Path
) -> None:
    run_id, ticket_id = paused_run(server)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in(page, server, "supervisor")

    item = page.locator(f"article#{ticket_id}")
    assert "refund-above-100-needs-approval" in item.inner_text()
    assert "refunds above 100 need a supervisor" in item.inner_text()
    assert "Ada Lovelace" in item.inner_text()  # the evidence: the order as looked up
    page.screenshot(path=str(shots / "inbox.png"), full_page=True)

    # A second tab follows the run's timeline while the decision is made in the first.
    watcher = context.new_page()
    watcher.goto(f"{server.url}/runs/{run_id}")
    assert watcher.inner_text("#run-status") == "paused"
    watcher.evaluate("window.notReloaded = true")

    # Edit the amount and approve, from the keyboard.
    item.get_by_text("Edit the arguments and approve").focus()
    page.keyboard.press("Enter")
    edited = {"order_id": "A-1001", "amount": 150.0, "reason": "kettle arrived broken"}
    item.get_by_label("Arguments (JSON)").fill(json.dumps(edited))
    item.get_by_label("Why the change").fill("the kettle's lid was fine: partial refund")
    item.get_by_role("button", name="Approve the edited call").focus()
    page.keyboard.press("Enter")
    page.wait_for_url(f"{server.url}/runs/{run_id}")

    # The watching tab shows the run complete, without reloading: rows and status came
    # over server-sent events.
    watcher.wait_for_selector("#run-status.status-completed", timeout=20_000)
    assert watcher.evaluate("window.notReloaded") is True
    refunds = watcher.locator("#rows tr", has_text="issue_refund(").all_inner_texts()
    executed = [r for r in refunds if "executed" in r]
    # The model proposed 180; the approver's 150 is what ran, and what the ledger holds.
    assert len(executed) == 1 and "amount=180.0" in executed[0] and "verified" in executed[0]
    assert '"amount": 150.0' in executed[0] and '"ledger_amount": 150.0' in executed[0]
    assert "arguments edited" in watcher.locator("#rows").inner_text()
    assert "default:exit" in watcher.locator("#rows").inner_text()
    watcher.screenshot(path=str(shots / "timeline.png"), full_page=True)
    watcher.locator("figure.graph").screenshot(path=str(shots / "graph.png"))
    # The run's path is drawn to its end: the graph came again as the run moved on.
    assert f"run {run_id}" in watcher.locator("figure.graph").inner_text()
    visited = watcher.locator("figure.graph g.state.visited text:first-of-type").all_text_contents()
    assert visited == ["intake", "resolve", "done"]
    assert watcher.evaluate("window.notReloaded") is True
    context.close()


def test_a_viewer_sees_no_approve_button_and_forged_posts_are_refused(
    browser: Any, server: WebServer
) -> None:
    _, ticket_id = paused_run(server)
    viewer = browser.new_context()
    page = viewer.new_page()
    sign_in(page, server, "viewer")
    item = page.locator(f"article#{ticket_id}")
    assert "refund-above-100-needs-approval" in item.inner_text()
    assert page.get_by_role("button", name="Approve").count() == 0
    assert page.get_by_role("button", name="Deny").count() == 0
    assert "cannot decide it" in item.inner_text()
    viewer.close()

    supervisor = browser.new_context()
    page = supervisor.new_page()
    sign_in(page, server, "supervisor")
    assert page.locator(f"article#{ticket_id}").get_by_role("button", name="Approve").count() == 1
    # A POST with the session's cookie but without its CSRF token (what a script that got
    # hold of the cookie would send) is refused.
    forged = supervisor.request.post(f"{server.url}/tickets/{ticket_id}/approve", form={"reason": "ok"})
    assert forged.status == 403 and "CSRF" in forged.text()
    # A form on another site posting to the server: the cookie is SameSite=Strict, so the
    # browser does not send it, and the server sees no session at all.
    page.set_content(
        f'<form method="post" action="{server.url}/tickets/{ticket_id}/approve">'
        '<input type="hidden" name="csrf" value="guessed"><button>win a prize</button></form>'
    )
    with page.expect_navigation():
        page.get_by_role("button", name="win a prize").click()
    assert "Refused" in page.content()
    page.goto(f"{server.url}/inbox")
    assert page.locator(f"article#{ticket_id}").get_by_role("button", name="Approve").count() == 1
    supervisor.close()
