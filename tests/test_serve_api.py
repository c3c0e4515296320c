"""The HTTP API of `tether serve`, against a real server process (uvicorn) over SQLite:
every endpoint, who may call it and who may not, idempotent starts, live events.

One server per module (starting one takes a second); each test starts its own runs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from servers import REFUND, REFUND_INPUT, Served, serve
from tether import identity
from tether.identity import Principal
from tether.journal import open_journal

TIMEOUT = 30.0


@dataclass
class Api:
    served: Served
    db: Path
    tokens: dict[str, str]

    def call(self, method: str, path: str, who: str | None = "admin", **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens.get(who, who)}"
        return httpx.request(method, self.served.url + path, headers=headers, timeout=TIMEOUT, **kw)

    def start(self, who: str = "operator", **kw: Any) -> dict[str, Any]:
        response = self.call(
            "POST", "/api/v1/runs", who, json={"workflow": "refund", "input": REFUND_INPUT}, **kw
        )
        assert response.status_code == 201, response.text
        return dict(response.json())

    def wait(self, run_id: str, *statuses: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            run = self.call("GET", f"/api/v1/runs/{run_id}").json()["run"]
            if run["status"] in statuses:
                return dict(run)
            time.sleep(0.1)
        raise AssertionError(f"run {run_id} never became {statuses}: {run}")

    def paused_ticket(self) -> tuple[str, str]:
        """A refund run paused on its supervisor approval: (run id, ticket id)."""
        run = self.wait(self.start()["run_id"], "paused")
        return run["run_id"], run["ticket_id"]


TOKENS: dict[str, dict[str, Any]] = {
    "admin": {"role": "admin"},
    "viewer": {"role": "viewer"},
    "operator": {"role": "operator"},
    "supervisor": {"role": "approver", "approver_for": ["supervisor"]},
    "finance": {"role": "approver", "approver_for": ["finance"]},
    "elsewhere": {"role": "approver", "approver_for": ["supervisor"], "workflows": ["payroll"]},
    "expired": {"role": "admin", "expires_in": 0.5},
    "revoked": {"role": "admin"},
}


async def _tokens(db: Path) -> dict[str, str]:
    journal = open_journal(str(db))
    try:
        made = {}
        for name, spec in TOKENS.items():
            spec = {"expires_in": None, **spec}
            made[name], info = await identity.create_token(journal, name=name, **spec)
            if name == "revoked":
                await identity.revoke_token(journal, info.token_id, Principal.local())
        return made
    finally:
        await journal.aclose()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    workdir = tmp_path_factory.mktemp("serve")
    db = workdir / "journal.db"
    tokens = asyncio.run(_tokens(db))
    served = serve(str(db), workdir)
    try:
        yield Api(served, db, tokens)
    finally:
        served.stop()


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is problem JSON (RFC 9457) with this status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = dict(response.json())
    assert {"type", "title", "status", "detail", "code"} <= body.keys()
    assert body["status"] == status and body["code"] == code, body
    return body


# -- who may call -----------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", "/api/v1/me"),
    ("GET", "/api/v1/workflows"),
    ("GET", "/api/v1/runs"),
    ("POST", "/api/v1/runs"),
    ("GET", "/api/v1/runs/run_x"),
    ("GET", "/api/v1/runs/run_x/events"),
    ("GET", "/api/v1/tickets"),
    ("POST", "/api/v1/tickets/tkt_x/approve"),
    ("POST", "/api/v1/tickets/tkt_x/deny"),
    ("POST", "/api/v1/tickets/tkt_x/answer"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_endpoint_refuses_a_caller_without_a_valid_token(api: Api, method: str, path: str) -> None:
    body = problem(api.call(method, path, None), 401, "unauthenticated")
    assert "Bearer" in body["detail"]
    assert api.call(method, path, None).headers["www-authenticate"].startswith("Bearer")
    problem(api.call(method, path, "tth_not-a-token-anyone-made"), 401, "unauthenticated")
    problem(api.call(method, path, "revoked"), 401, "token_revoked")
    time.sleep(0.6)  # the expired token lived half a second (by the store's clock)
    problem(api.call(method, path, "expired"), 401, "token_expired")


def test_the_api_says_who_the_token_belongs_to(api: Api) -> None:
    me = api.call("GET", "/api/v1/me", "supervisor").json()
    assert me == {
        "principal_id": "person:supervisor",
        "name": "supervisor",
        "kind": "person",
        "role": "approver",
        "approver_for": ["supervisor"],
        "workflows": [],
    }


def test_a_viewer_sees_runs_but_may_not_start_one_or_decide(api: Api) -> None:
    run_id, ticket_id = api.paused_ticket()
    assert any(r["run_id"] == run_id for r in api.call("GET", "/api/v1/runs", "viewer").json()["runs"])
    assert api.call("GET", f"/api/v1/runs/{run_id}", "viewer").status_code == 200
    started = api.call("POST", "/api/v1/runs", "viewer", json={"workflow": "refund", "input": REFUND_INPUT})
    assert "operator" in problem(started, 403, "forbidden")["detail"]
    listed = {t["ticket_id"]: t for t in api.call("GET", "/api/v1/tickets", "viewer").json()["tickets"]}
    assert listed[ticket_id]["actions"] == []
    problem(api.call("POST", f"/api/v1/tickets/{ticket_id}/approve", "viewer", json={}), 403, "forbidden")
    problem(
        api.call("POST", f"/api/v1/tickets/{ticket_id}/deny", "operator", json={"reason": "no"}),
        403,
        "forbidden",
    )
    assert api.call("GET", f"/api/v1/runs/{run_id}").json()["run"]["status"] == "paused"


def test_an_approver_for_another_role_or_workflow_may_not_decide(api: Api) -> None:
    run_id, ticket_id = api.paused_ticket()
    listed = {t["ticket_id"]: t for t in api.call("GET", "/api/v1/tickets", "finance").json()["tickets"]}
    assert listed[ticket_id]["actions"] == [] and listed[ticket_id]["approver"] == "supervisor"
    refused = problem(
        api.call("POST", f"/api/v1/tickets/{ticket_id}/approve", "finance", json={}), 403, "forbidden"
    )
    assert "'supervisor'" in refused["detail"] and "finance" in refused["detail"]
    # Scoped to another workflow: it does not even see this run or its ticket.
    elsewhere = api.call("POST", f"/api/v1/tickets/{ticket_id}/approve", "elsewhere", json={})
    assert "payroll" in problem(elsewhere, 403, "forbidden")["detail"]
    assert api.call("GET", "/api/v1/runs", "elsewhere").json()["runs"] == []
    assert api.call("GET", "/api/v1/tickets", "elsewhere").json()["tickets"] == []
    problem(api.call("GET", f"/api/v1/runs/{run_id}", "elsewhere"), 403, "forbidden")
    assert api.call("GET", f"/api/v1/runs/{run_id}").json()["run"]["status"] == "paused"


# -- runs ---------------------------------------------------------------------------------------


def test_an_approved_refund_completes_and_the_ticket_cannot_be_used_twice(api: Api) -> None:
    run_id, ticket_id = api.paused_ticket()
    listed = {t["ticket_id"]: t for t in api.call("GET", "/api/v1/tickets", "supervisor").json()["tickets"]}
    assert listed[ticket_id]["actions"] == ["approve", "deny"]
    assert listed[ticket_id]["args"] == {
        "order_id": "A-1001",
        "amount": 180.0,
        "reason": "kettle arrived broken",
    }
    decided = api.call("POST", f"/api/v1/tickets/{ticket_id}/approve", "supervisor", json={"reason": "ok"})
    assert decided.status_code == 200, decided.text
    assert decided.json()["ticket"]["status"] == "approved"
    assert decided.json()["ticket"]["decided_by"] == "person:supervisor"
    again = api.call(
        "POST", f"/api/v1/tickets/{ticket_id}/deny", "supervisor", json={"reason": "changed my mind"}
    )
    # Already approved, or already used by the run: either way not decided again.
    assert "is already" in problem(again, 409, "ticket_conflict")["detail"]
    done = api.wait(run_id, "completed")
    assert done["status"] == "completed"
    shown = api.call("GET", f"/api/v1/runs/{run_id}", "viewer").json()
    assert shown["chain"] == {"intact": True, "problems": []}
    assert shown["data"]["refunded"] == 180.0
    refunds = [s for s in shown["steps"] if (s["proposal"] or {}).get("tool") == "issue_refund"]
    assert [s["decision"] for s in refunds if s["decision"]][:2] == ["deny", "ask"]
    decided_rows = [s for s in shown["steps"] if s["kind"] == "ticket_decided"]
    assert len(decided_rows) == 1 and "person:supervisor" in decided_rows[0]["detail"]


def test_a_denied_refund_is_not_paid_and_a_deny_needs_a_reason(api: Api) -> None:
    run_id, ticket_id = api.paused_ticket()
    problem(
        api.call("POST", f"/api/v1/tickets/{ticket_id}/deny", "supervisor", json={}), 422, "invalid_request"
    )
    problem(
        api.call("POST", f"/api/v1/tickets/{ticket_id}/answer", "supervisor", json={"answer": "x"}),
        409,
        "wrong_ticket_kind",
    )
    denied = api.call("POST", f"/api/v1/tickets/{ticket_id}/deny", "supervisor", json={"reason": "too much"})
    assert denied.json()["ticket"]["status"] == "denied"
    run = api.wait(run_id, "completed", "failed", "escalated")
    shown = api.call("GET", f"/api/v1/runs/{run_id}").json()
    assert run["status"] != "completed" or "refunded" not in shown["data"]


def test_unknown_runs_and_tickets_are_404_and_bad_bodies_422(api: Api) -> None:
    problem(api.call("GET", "/api/v1/runs/run_nope"), 404, "not_found")
    problem(api.call("GET", "/api/v1/runs/run_nope/events"), 404, "not_found")
    problem(api.call("POST", "/api/v1/tickets/tkt_nope/approve", json={}), 404, "not_found")
    problem(api.call("POST", "/api/v1/runs", json={"workflow": "nope"}), 422, "unknown_workflow")
    problem(api.call("POST", "/api/v1/runs", json={"workflow": "refund", "extra": 1}), 422, "invalid_request")
    problem(api.call("POST", "/api/v1/runs", content=b"{not json"), 422, "invalid_request")
    problem(api.call("GET", "/api/v1/runs?status=sleeping"), 422, "invalid_request")
    problem(api.call("GET", "/api/v1/runs?since=yesterday"), 422, "invalid_request")
    problem(api.call("GET", "/api/v1/runs?cursor=%%%"), 422, "invalid_request")
    problem(api.call("GET", "/api/v1/nowhere"), 404, "no_route")
    problem(api.call("DELETE", "/api/v1/runs"), 405, "method_not_allowed")


def test_the_same_idempotency_key_and_body_start_one_run_another_body_is_a_conflict(api: Api) -> None:
    key = {"Idempotency-Key": f"order-A-1001-{time.time_ns()}"}
    first = api.call(
        "POST", "/api/v1/runs", "operator", json={"workflow": "refund", "input": REFUND_INPUT}, headers=key
    )
    again = api.call(
        "POST", "/api/v1/runs", "operator", json={"workflow": "refund", "input": REFUND_INPUT}, headers=key
    )
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["run_id"] == again.json()["run_id"]
    other = api.call(
        "POST",
        "/api/v1/runs",
        "operator",
        json={"workflow": "refund", "input": {"order_id": "B-2"}},
        headers=key,
    )
    assert problem(other, 409, "idempotency_conflict")["run_id"] == first.json()["run_id"]
    # The key is the caller's: another principal with the same key starts its own run.
    theirs = api.call(
        "POST", "/api/v1/runs", "admin", json={"workflow": "refund", "input": REFUND_INPUT}, headers=key
    )
    assert theirs.status_code == 201 and theirs.json()["run_id"] != first.json()["run_id"]


def test_runs_are_listed_newest_first_filtered_and_paged(api: Api) -> None:
    since = time.time()
    started = [api.start()["run_id"] for _ in range(3)]
    for run_id in started:
        api.wait(run_id, "paused")
    cutoff = int(since) - 1  # whole seconds: the ISO 8601 time below says exactly this
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(cutoff)) + "Z"
    page = api.call("GET", f"/api/v1/runs?since={iso}&limit=2&status=paused&workflow=refund").json()
    assert [r["run_id"] for r in page["runs"]] == started[::-1][:2]
    rest = api.call(
        "GET", f"/api/v1/runs?since={iso}&limit=2&status=paused&cursor={page['next_cursor']}"
    ).json()
    assert [r["run_id"] for r in rest["runs"]][:1] == started[:1]
    assert api.call("GET", "/api/v1/runs?status=paused&owner=supervisor&limit=200").json()["runs"]
    assert api.call("GET", "/api/v1/runs?owner=nobody").json() == {"runs": [], "next_cursor": None}
    assert api.call("GET", f"/api/v1/runs?until={iso}&workflow=refund&limit=200").json()["runs"] == [
        r for r in api.call("GET", "/api/v1/runs?limit=200").json()["runs"] if r["created_at"] < cutoff
    ]


# -- live events --------------------------------------------------------------------------------


def events(response: httpx.Response) -> Iterator[tuple[str | None, str, dict[str, Any]]]:
    """(id, event, data) of each server-sent event as it arrives."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if "data" in fields:
                yield fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])
            fields = {}
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")


def test_a_run_streams_live_until_it_ends_and_a_client_resumes_after_the_last_id_it_saw(api: Api) -> None:
    run_id, ticket_id = api.paused_ticket()
    headers = {"Authorization": f"Bearer {api.tokens['viewer']}"}
    url = f"{api.served.url}/api/v1/runs/{run_id}/events"
    seen: list[int] = []
    with httpx.stream("GET", url, headers=headers, timeout=TIMEOUT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for event_id, kind, data in events(response):
            assert kind == "entry" and event_id is not None
            seen.append(int(event_id))
            if data["outcome"] == "awaiting_approval":
                break
    assert seen == list(range(1, len(seen) + 1))
    # Reconnect after the third entry: entries 4.. again, then live ones once approved.
    resumed: list[int] = []
    with httpx.stream("GET", url, headers={**headers, "Last-Event-ID": "3"}, timeout=TIMEOUT) as response:
        for event_id, kind, data in events(response):
            if kind == "end":
                assert data == {"status": "completed"}
                break
            resumed.append(int(event_id or 0))
            if int(event_id or 0) == seen[-1]:
                decided = api.call("POST", f"/api/v1/tickets/{ticket_id}/approve", "supervisor", json={})
                assert decided.status_code == 200
    last = api.call("GET", f"/api/v1/runs/{run_id}").json()["run"]["last_seq"]
    assert resumed == list(range(4, last + 1)) and last > seen[-1]
    problem(
        api.call("GET", f"/api/v1/runs/{run_id}/events", headers={"Last-Event-ID": "x"}),
        422,
        "invalid_request",
    )


def test_the_openapi_document_describes_every_endpoint(api: Api) -> None:
    document = httpx.get(api.served.url + "/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    declared = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert {
        (m, p.replace("run_x", "{run_id}").replace("tkt_x", "{ticket_id}")) for m, p in ENDPOINTS
    } <= declared
    start = document["paths"]["/api/v1/runs"]["post"]
    assert {"201", "200", "401", "403", "409", "422"} <= start["responses"].keys()
    assert any(p["name"] == "Idempotency-Key" for p in start["parameters"])


def test_edited_arguments_are_checked_again_and_a_denied_edit_changes_nothing(api: Api) -> None:
    run_id, ticket_id = api.paused_ticket()
    over = {"order_id": "A-1001", "amount": 650.0, "reason": "kettle arrived broken"}
    refused = api.call("POST", f"/api/v1/tickets/{ticket_id}/approve", "supervisor", json={"args": over})
    assert "refund-over-hard-limit" in problem(refused, 422, "edit_refused")["detail"]
    listed = {t["ticket_id"]: t for t in api.call("GET", "/api/v1/tickets").json()["tickets"]}
    assert listed[ticket_id]["status"] == "pending" and listed[ticket_id]["args"]["amount"] == 180.0
    less = {**over, "amount": 150.0}
    approved = api.call("POST", f"/api/v1/tickets/{ticket_id}/approve", "supervisor", json={"args": less})
    assert approved.status_code == 200, approved.text
    assert approved.json()["ticket"]["args"]["amount"] == 150.0
    api.wait(run_id, "completed", "failed", "escalated")
    steps = api.call("GET", f"/api/v1/runs/{run_id}").json()["steps"]
    paid = [
        s for s in steps if s["outcome"] == "executed" and (s["proposal"] or {}).get("tool") == "issue_refund"
    ]
    # The model proposed 180; the run executed exactly the approver's 150, once.
    assert [s["result"]["refunded"] for s in paid] == [150.0]


# -- separation of duties: a rule with approvals: 2 and forbid_self_approval -------------------


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A server whose refund policy needs two distinct supervisors, neither the starter."""
    workdir = tmp_path_factory.mktemp("team")
    folder = workdir / "refund"
    shutil.copytree(REFUND, folder, ignore=shutil.ignore_patterns("__pycache__"))
    policy = (folder / "policy.yaml").read_text()
    asked = "    approver: supervisor\n"
    assert asked in policy
    (folder / "policy.yaml").write_text(
        policy.replace(asked, asked + "    approvals: 2\n    forbid_self_approval: true\n", 1)
    )
    db = workdir / "journal.db"
    tokens = asyncio.run(_tokens(db))
    tokens |= asyncio.run(
        _more_tokens(db, {"supervisor2": {"role": "approver", "approver_for": ["supervisor"]}})
    )
    served = serve(str(db), workdir, workflows=folder)
    try:
        yield Api(served, db, tokens)
    finally:
        served.stop()


async def _more_tokens(db: Path, specs: dict[str, dict[str, Any]]) -> dict[str, str]:
    journal = open_journal(str(db))
    try:
        return {
            name: (await identity.create_token(journal, name=name, expires_in=None, **spec))[0]
            for name, spec in specs.items()
        }
    finally:
        await journal.aclose()


def test_the_starter_may_not_approve_and_two_distinct_approvers_are_needed(team: Api) -> None:
    run_id = team.start("admin")["run_id"]  # an admin starts it: even an admin may not approve it
    ticket_id = team.wait(run_id, "paused")["ticket_id"]
    own = team.call("POST", f"/api/v1/tickets/{ticket_id}/approve", "admin", json={})
    assert "forbid_self_approval" in problem(own, 403, "forbidden")["detail"]
    first = team.call("POST", f"/api/v1/tickets/{ticket_id}/approve", "supervisor", json={"reason": "1"})
    assert first.status_code == 200 and first.json()["ticket"]["status"] == "pending"
    twice = team.call("POST", f"/api/v1/tickets/{ticket_id}/approve", "supervisor", json={"reason": "again"})
    assert "already" in problem(twice, 409, "ticket_conflict")["detail"]
    assert team.call("GET", f"/api/v1/runs/{run_id}").json()["run"]["status"] == "paused"
    second = team.call("POST", f"/api/v1/tickets/{ticket_id}/approve", "supervisor2", json={"reason": "2"})
    assert second.json()["ticket"]["status"] == "approved"
    team.wait(run_id, "completed")
    steps = team.call("GET", f"/api/v1/runs/{run_id}").json()["steps"]
    kinds = [s["kind"] for s in steps]
    assert kinds.count("approval_given") == 2 and kinds.count("ticket_decided") == 1
