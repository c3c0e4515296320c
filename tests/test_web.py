"""The web interface over HTTP, against a real `tether serve` (uvicorn, SQLite, one worker)
driving the refund example: sessions, CSRF, who may decide, the pages' content."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tether.identity import Principal, list_tokens, revoke_token
from tether.journal import open_journal
from web_server import WebServer, start


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    running = start(tmp_path_factory.mktemp("web"))
    try:
        yield running
    finally:
        running.stop()


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


Browse = Callable[[str | None], httpx.Client]


@pytest.fixture
def browse(server: WebServer) -> Iterator[Browse]:
    """Clients of the server: signed in as a token's name, or anonymous (None)."""
    opened: list[httpx.Client] = []

    def client(who: str | None) -> httpx.Client:
        opened.append(httpx.Client(base_url=server.url))
        return sign_in(server, opened[-1], who) if who else opened[-1]

    yield client
    for c in opened:
        c.close()


def sign_in(server: WebServer, client: httpx.Client, who: str) -> httpx.Client:
    page = client.get("/login")
    response = client.post(
        "/login", data={"csrf": _csrf(page.text), "token": server.tokens[who], "next": "/inbox"}
    )
    assert response.status_code == 303 and response.headers["location"] == "/inbox"
    return client


def paused_run(server: WebServer) -> tuple[str, str]:
    """A refund run waiting for the supervisor, and its ticket."""
    run_id = server.submit()
    server.wait_for(run_id, "paused")
    headers = {"Authorization": f"Bearer {server.tokens['admin']}"}
    run = httpx.get(f"{server.url}/api/v1/runs/{run_id}", headers=headers).json()["run"]
    return run_id, run["ticket_id"]


def ticket_status(server: WebServer, ticket_id: str) -> str:
    async def read() -> str:
        journal = open_journal(str(server.db))
        try:
            return (await journal.get_ticket(ticket_id)).status
        finally:
            await journal.aclose()

    return asyncio.run(read())


def test_pages_need_a_session_whose_cookie_is_httponly_and_strict(server: WebServer, browse: Browse) -> None:
    anonymous = browse(None)
    for path in ("/inbox", "/runs", "/runs/run_x"):
        response = anonymous.get(path)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/login?next=")
    login = anonymous.get("/login")
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert "default-src 'self'" in login.headers["content-security-policy"]


def test_a_wrong_token_does_not_sign_in(server: WebServer, browse: Browse) -> None:
    client = browse(None)
    csrf = _csrf(client.get("/login").text)
    response = client.post("/login", data={"csrf": csrf, "token": "tth_not-a-real-token"})
    assert response.status_code == 401
    assert "unknown API token" in response.text
    assert client.get("/inbox").status_code == 303  # still not signed in


def test_signing_in_goes_back_only_to_this_site(server: WebServer, browse: Browse) -> None:
    client = browse(None)
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        csrf = _csrf(client.get("/login").text)  # signing in starts a new session, with a new token
        response = client.post(
            "/login", data={"csrf": csrf, "token": server.tokens["viewer"], "next": target}
        )
        assert response.status_code == 303 and response.headers["location"] == "/inbox"


def test_the_inbox_shows_what_the_approver_needs_to_decide(server: WebServer, browse: Browse) -> None:
    run_id, ticket_id = paused_run(server)
    html = browse("supervisor").get("/inbox").text
    item = html[html.index(f'id="{ticket_id}"') :]
    item = item[: item.index("</article>")]
    assert run_id in item and "state <strong>resolve</strong>" in item
    assert 'issue_refund(amount=180.0, order_id="A-1001", reason="kettle arrived broken")' in item
    # The rule that asked, with its reason; the evidence so far: the order looked up, and
    # the refund of 650 the hard limit refused.
    assert "refund-above-100-needs-approval" in item and "refunds above 100 need a supervisor" in item
    assert "lookup_order" in item and "Ada Lovelace" in item and "verified" in item
    assert "refund-over-hard-limit" in item
    # The facts the rule's condition read (established by the lookup's verifier).
    assert "<code>facts.order_total</code></td><td><code>180.0</code>" in item
    for action in ("approve", "deny", "edit"):
        assert f'action="/tickets/{ticket_id}/{action}"' in item


def test_a_viewer_sees_the_ticket_but_cannot_decide_it(server: WebServer, browse: Browse) -> None:
    _, ticket_id = paused_run(server)
    client = browse("viewer")
    html = client.get("/inbox").text
    assert ticket_id in html
    assert f"/tickets/{ticket_id}/approve" not in html and ">Approve<" not in html
    assert "your role (viewer) cannot decide it" in html
    # With the session's own CSRF token, the server still refuses the viewer.
    response = client.post(f"/tickets/{ticket_id}/approve", data={"csrf": _csrf(html)})
    assert response.status_code == 403 and "needs role approver" in response.text
    assert ticket_status(server, ticket_id) == "pending"


def test_an_approver_for_another_role_cannot_decide(server: WebServer, browse: Browse) -> None:
    _, ticket_id = paused_run(server)
    client = browse("finance")
    html = client.get("/inbox").text
    assert f"/tickets/{ticket_id}/approve" not in html
    response = client.post(f"/tickets/{ticket_id}/approve", data={"csrf": _csrf(html)})
    assert response.status_code == 403 and "this principal approves for finance" in response.text
    assert ticket_status(server, ticket_id) == "pending"


def test_a_forged_post_is_refused_without_the_sessions_csrf_token(server: WebServer, browse: Browse) -> None:
    _, ticket_id = paused_run(server)
    client = browse("supervisor")
    other = browse("supervisor")  # a second session: its token is not this one's
    foreign = _csrf(other.get("/inbox").text)
    for data in ({}, {"csrf": ""}, {"csrf": "forged"}, {"csrf": foreign}):
        response = client.post(f"/tickets/{ticket_id}/approve", data=data)
        assert response.status_code == 403 and "CSRF" in response.text
    assert ticket_status(server, ticket_id) == "pending"
    # Signing out is a form too.
    assert client.post("/logout", data={"csrf": "forged"}).status_code == 403
    assert client.get("/inbox").status_code == 200


def test_deny_needs_a_reason_and_records_who_denied(server: WebServer, browse: Browse) -> None:
    run_id, ticket_id = paused_run(server)
    client = browse("supervisor")
    csrf = _csrf(client.get("/inbox").text)
    refused = client.post(f"/tickets/{ticket_id}/deny", data={"csrf": csrf, "reason": " "})
    assert refused.status_code == 422 and ticket_status(server, ticket_id) == "pending"
    denied = client.post(
        f"/tickets/{ticket_id}/deny", data={"csrf": csrf, "reason": "no photo of the damage"}
    )
    assert denied.status_code == 303 and denied.headers["location"] == f"/runs/{run_id}"
    assert ticket_status(server, ticket_id) == "denied"
    again = client.post(f"/tickets/{ticket_id}/approve", data={"csrf": csrf})
    assert again.status_code == 409 and "already denied" in again.text
    timeline = client.get(f"/runs/{run_id}").text
    assert "person:supervisor" in timeline and "no photo of the damage" in timeline


def test_edited_arguments_must_be_a_json_object(server: WebServer, browse: Browse) -> None:
    _, ticket_id = paused_run(server)
    client = browse("supervisor")
    csrf = _csrf(client.get("/inbox").text)
    for args, said in (("{amount: 5", "not JSON"), ("[1, 2]", "must be a JSON object")):
        response = client.post(f"/tickets/{ticket_id}/edit", data={"csrf": csrf, "args": args})
        assert response.status_code == 422 and said in response.text
    assert ticket_status(server, ticket_id) == "pending"


def test_a_revoked_token_ends_the_session_at_once(server: WebServer, browse: Browse) -> None:
    client = browse("viewer")
    assert client.get("/runs").status_code == 200

    async def revoke() -> None:
        journal = open_journal(str(server.db))
        try:
            viewer = next(t for t in await list_tokens(journal) if t.name == "viewer")
            await revoke_token(journal, viewer.token_id, Principal.local())
        finally:
            await journal.aclose()

    asyncio.run(revoke())
    response = client.get("/runs")
    assert response.status_code == 303 and response.headers["location"].startswith("/login")


def test_run_list_filters_and_the_run_pages(server: WebServer, browse: Browse) -> None:
    run_id, _ = paused_run(server)
    client = browse("admin")
    paused = client.get("/runs", params={"status": "paused", "workflow": "refund"}).text
    assert run_id in paused
    assert run_id not in client.get("/runs", params={"status": "completed"}).text
    assert client.get("/runs", params={"status": "nonsense"}).status_code == 422
    page = client.get(f"/runs/{run_id}").text
    assert "<svg" in page and "awaiting_approval" in page and f"ticket {run_id}" not in page
    assert 'sse-connect="/runs/' in page  # live while the run is not finished
    graph = client.get(f"/runs/{run_id}/graph.svg")
    assert graph.headers["content-type"].startswith("image/svg+xml") and f"run {run_id}" in graph.text
    policy = client.get(f"/runs/{run_id}/policy").text
    for rule in ("refund-over-hard-limit", "refund-needs-verified-order", "refund-above-100-needs-approval"):
        assert rule in policy
    assert "when: args.amount &gt; 500.0" in policy  # each rule's text, escaped
    assert client.get("/runs/run_nope").status_code == 404


def test_a_question_is_answered_from_the_inbox(server: WebServer, browse: Browse, tmp_path: Path) -> None:
    asks = [
        {"kind": "tool_call", "tool": "lookup_order", "args": {"order_id": "A-1002"}},
        {"kind": "question", "question": "Did the customer show the damage?"},
        {
            "kind": "tool_call",
            "tool": "issue_refund",
            "args": {"order_id": "A-1002", "amount": 64.5, "reason": "chipped"},
        },
        {"kind": "exit", "exit": "refunded"},
    ]
    script = tmp_path / "asks.json"
    script.write_text(json.dumps({"proposals": asks}))
    run_id = server.submit("A-1002", proposals=script)
    server.wait_for(run_id, "paused")
    client = browse("supervisor")
    html = client.get("/inbox").text
    found = re.search(r'<article class="card ticket" id="(tkt_\w+)"[^>]*>\s*<h2[^>]*>\s*Question', html)
    assert found, "the question is not in the inbox"
    ticket = found.group(1)
    item = html[html.index(f'id="{ticket}"') :]
    item = item[: item.index("</article>")]
    assert "Did the customer show the damage?" in item and run_id in item
    assert f"/tickets/{ticket}/answer" in item and f"/tickets/{ticket}/approve" not in item
    csrf = _csrf(html)
    # Approving a question is refused, and so is an empty answer.
    assert client.post(f"/tickets/{ticket}/approve", data={"csrf": csrf}).status_code == 409
    assert client.post(f"/tickets/{ticket}/answer", data={"csrf": csrf, "answer": ""}).status_code == 422
    answer = {"csrf": csrf, "answer": "yes: a photo of the chip"}
    assert client.post(f"/tickets/{ticket}/answer", data=answer).status_code == 303
    server.wait_for(run_id, "completed")
    assert "yes: a photo of the chip" in client.get(f"/runs/{run_id}").text


def test_a_principal_limited_to_other_workflows_sees_none_of_these_runs(
    server: WebServer, browse: Browse
) -> None:
    run_id, ticket_id = paused_run(server)
    client = browse("billing")
    assert run_id not in client.get("/runs").text
    assert run_id not in client.get("/runs", params={"workflow": "refund"}).text
    inbox = client.get("/inbox").text
    assert ticket_id not in inbox and "0 pending tickets" in inbox
    refused = client.get(f"/runs/{run_id}")
    assert refused.status_code == 403 and "limited to billing" in refused.text
    assert client.get(f"/runs/{run_id}/graph.svg").status_code == 403


def test_the_live_stream_resumes_after_the_last_event_id_and_ends_with_the_run(
    server: WebServer, browse: Browse
) -> None:
    run_id, ticket_id = paused_run(server)
    client = browse("supervisor")
    csrf = _csrf(client.get("/inbox").text)
    assert client.post(f"/tickets/{ticket_id}/approve", data={"csrf": csrf}).status_code == 303
    server.wait_for(run_id, "completed")
    events: list[tuple[str, str, str]] = []
    headers = {"Last-Event-ID": "7"}  # a browser reconnecting after it saw entry 7
    with client.stream("GET", f"/runs/{run_id}/events", headers=headers, timeout=10) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event, ident, data = "", "", []
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("id:"):
                ident = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and event:
                events.append((event, ident, "\n".join(data)))
                event, ident, data = "", "", []
    rows = [(ident, data) for event, ident, data in events if event == "rows"]
    assert [ident for ident, _ in rows] == [str(seq) for seq in range(8, 8 + len(rows))] and rows
    assert all(data.startswith("<tr id=") for _, data in rows)
    assert events[-1][0] == "end" and events[-1][2] == "completed"
    assert "status-completed" in events[-2][2]  # the status line, swapped in before the end
