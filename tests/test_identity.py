"""Principals and API tokens: created once, stored as hashes, expiring by the store's clock,
revocable; and what each role may do (tether.identity), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import pytest

from tether.errors import AuthError, Forbidden, TetherError
from tether.identity import (
    Principal,
    allowed,
    authenticate,
    authorize,
    create_token,
    hash_token,
    list_tokens,
    revoke_token,
)
from tether.journal import RunRecord, Ticket, open_journal

pytest_plugins = ("stores",)  # the db_target fixture: SQLite and PostgreSQL


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_token_is_shown_once_stored_as_its_hash_and_authenticates(db_target: str) -> None:
    async def main() -> str:
        async with open_journal(db_target) as journal:
            token, info = await create_token(
                journal, name="alice", role="approver", approver_for=["supervisor"], expires_in=3600
            )
            assert token.startswith("tth_") and len(token) > 40
            assert info.principal_id == "person:alice" and info.approver_for == ("supervisor",)
            assert info.expires_at is not None and 3590 < info.expires_at - info.created_at <= 3600.5
            principal = await authenticate(journal, token)
            assert principal == info.principal()
            assert principal.role == "approver" and principal.token_id == info.token_id
            with pytest.raises(AuthError) as wrong:
                await authenticate(journal, token[:-1] + ("A" if token[-1] != "A" else "B"))
            assert wrong.value.code == "unauthenticated"
            with pytest.raises(AuthError) as malformed:
                await authenticate(journal, "Bearer nonsense")
            assert malformed.value.code == "unauthenticated"
            assert [t.token_id for t in await list_tokens(journal)] == [info.token_id]
            return token

    token = run(main())
    if "://" not in db_target:  # the plaintext is nowhere in the database
        raw = sqlite3.connect(db_target).execute("SELECT * FROM tokens").fetchall()
        assert len(raw) == 1 and all("tth_" not in str(v) for v in raw[0])
        assert raw[0][7] == hash_token(token)  # only its SHA-256 is kept


def test_an_expired_token_is_refused_by_the_store_clock(db_target: str) -> None:
    async def main() -> None:
        async with open_journal(db_target) as journal:
            token, info = await create_token(journal, name="bob", role="viewer", expires_in=0.3)
            assert (await authenticate(journal, token)).principal_id == "person:bob"
            await asyncio.sleep(0.5)
            with pytest.raises(AuthError) as expired:
                await authenticate(journal, token)
            assert expired.value.code == "token_expired" and info.token_id in str(expired.value)

    run(main())


def test_a_revoked_token_never_authenticates_again(db_target: str) -> None:
    async def main() -> None:
        async with open_journal(db_target) as journal:
            token, info = await create_token(
                journal, name="svc", role="operator", expires_in=None, kind="service"
            )
            assert info.expires_at is None and info.principal_id == "service:svc"
            viewer = (await create_token(journal, name="v", role="viewer", expires_in=None))[0]
            with pytest.raises(Forbidden, match="needs role admin"):
                await revoke_token(journal, info.token_id, await authenticate(journal, viewer))
            assert (await authenticate(journal, token)).role == "operator"
            revoked = await revoke_token(journal, info.token_id, Principal.local())
            assert revoked.revoked_by == Principal.local().principal_id and revoked.revoked_at
            with pytest.raises(AuthError) as refused:
                await authenticate(journal, token)
            assert refused.value.code == "token_revoked"
            with pytest.raises(TetherError, match="no token"):
                await revoke_token(journal, "tok_missing", Principal.local())

    run(main())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "has space", "role": "viewer"}, "name"),
        ({"name": "carol", "role": "root"}, "role 'root'"),
        ({"name": "carol", "role": "approver"}, "--approver-for"),
        ({"name": "carol", "role": "viewer", "approver_for": ["supervisor"]}, "applies to role approver"),
        ({"name": "carol", "role": "viewer", "kind": "local"}, "kind"),
        ({"name": "carol", "role": "viewer", "expires_in": -1}, "positive"),
    ],
)
def test_a_bad_token_request_is_refused_and_creates_nothing(
    tmp_path: Any, kwargs: dict[str, Any], message: str
) -> None:
    async def main() -> None:
        async with open_journal(str(tmp_path / "j.db")) as journal:
            with pytest.raises(TetherError, match=message):
                await create_token(journal, **({"expires_in": None} | kwargs))
            assert await list_tokens(journal) == []

    run(main())


def _principal(role: str, approver_for: tuple[str, ...] = (), workflows: tuple[str, ...] = ()) -> Principal:
    return Principal(
        principal_id=f"person:{role}",
        name=role,
        kind="person",
        role=role,  # type: ignore[arg-type]
        approver_for=approver_for,
        workflows=workflows,
    )


def _ticket(approver: str) -> Ticket:
    now = time.time()
    return Ticket(
        ticket_id="tkt_1",
        run_id="r1",
        step_id="s1",
        kind="approval",
        subject="refund",
        args_hash="h",
        approver=approver,
        created_at=now,
        expires_at=now + 60,
    )


def _run(workflow: str) -> RunRecord:
    now = time.time()
    return RunRecord(
        run_id="r1",
        workflow_name=workflow,
        workflow_version="1",
        workflow_hash="h",
        workflow_ref="x",
        policy_hash="p",
        state="s",
        created_at=now,
        updated_at=now,
    )


ROLE_TABLE = {
    "viewer": {"view"},
    "operator": {"view", "start", "cancel", "retry", "take_over"},
    "approver": {"view", "decide", "answer"},
    "admin": {"view", "start", "cancel", "retry", "take_over", "decide", "answer", "admin"},
}


@pytest.mark.parametrize("role", list(ROLE_TABLE))
def test_each_role_may_do_exactly_its_actions(role: str) -> None:
    principal = _principal(role, ("supervisor",) if role == "approver" else ())
    for action in ROLE_TABLE["admin"]:
        ok = allowed(principal, action, ticket=_ticket("supervisor"), run=_run("refund"))
        assert ok == (action in ROLE_TABLE[role]), (role, action)
    if role != "admin":
        with pytest.raises(Forbidden, match="admin"):
            authorize(principal, "admin")


def test_an_approver_decides_only_its_approver_roles_and_workflows() -> None:
    approver = _principal("approver", ("supervisor",), ("refund",))
    authorize(approver, "decide", ticket=_ticket("supervisor"), run=_run("refund"))
    with pytest.raises(Forbidden, match=r"for approver 'finance'.*approves for supervisor"):
        authorize(approver, "decide", ticket=_ticket("finance"), run=_run("refund"))
    with pytest.raises(Forbidden, match=r"workflow 'payroll'.*limited to refund"):
        authorize(approver, "decide", ticket=_ticket("supervisor"), run=_run("payroll"))
    with pytest.raises(Forbidden, match="workflow is not known"):
        authorize(approver, "decide", ticket=_ticket("supervisor"))
    operator = _principal("operator", workflows=("refund",))
    authorize(operator, "cancel", workflow="refund")
    with pytest.raises(Forbidden, match="may not start runs: that needs role operator"):
        authorize(_principal("approver", ("supervisor",)), "start", workflow="refund")
    with pytest.raises(Forbidden, match="may not decide tickets: that needs role approver"):
        authorize(operator, "decide", ticket=_ticket("supervisor"), run=_run("refund"))


def test_the_local_principal_is_an_admin_recorded_as_such() -> None:
    local = Principal.local()
    assert local.kind == "local" and local.role == "admin" and local.principal_id.startswith("local:")
    authorize(local, "admin")
    assert hash_token("x") == hash_token("x") != hash_token("y")


def test_a_principal_outside_the_vocabulary_is_refused_before_anything_is_recorded() -> None:
    # Recorded, it could never be read back (the journal would then look tampered with).
    with pytest.raises(ValueError, match="role must be one of"):
        Principal(principal_id="person:ana", name="ana", kind="person", role="supervisor")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind must be one of"):
        Principal(principal_id="robot:r", name="r", kind="robot", role="admin")  # type: ignore[arg-type]
