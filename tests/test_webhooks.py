"""Webhook notifications: the outbox written with the ticket, Standard Webhooks signatures
checked by a real HTTP receiver, retries, and delivery across a killed process.

Every store test runs on SQLite and on PostgreSQL ($TETHER_TEST_PG, default
postgresql://postgres@127.0.0.1:5432/test, one fresh schema per test): skipped without a
server, failed instead under CI=true.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError
from typer.testing import CliRunner

from tether.cli import app
from tether.errors import ConcurrentWriteError, TicketError
from tether.hashing import encode_json
from tether.journal import Commit, Journal, NewEntry, RunRecord, Ticket, open_journal
from tether.webhooks import (
    DispatchSettings,
    WebhookError,
    backoff,
    deliver_due,
    generate_secret,
    outbox_of,
    parse_secret,
    signature_headers,
)

ROOT = Path(__file__).resolve().parents[1]
REFUND = ROOT / "examples" / "refund"
pytest_plugins = ("stores",)  # the db_target fixture: SQLite and PostgreSQL
SECRET = generate_secret()
FAST = DispatchSettings(base_delay=0.05, max_delay=0.2, timeout=5.0, max_attempts=4)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- a real receiver -------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    valid: bool
    payload: Any


@dataclass
class Receiver:
    """An HTTP server in a thread that checks every request's Standard Webhooks signature
    with the official package, as a receiver would, and answers `fail_first` requests 500."""

    secret: str = SECRET
    fail_first: int = 0
    hold: threading.Event | None = None  # block the first request until this is set
    received: list[Received] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    payload, valid = Verifier(receiver.secret).verify(body, headers), True
                except WebhookVerificationError:
                    payload, valid = None, False
                receiver.received.append(Received(headers, body, valid, payload))
                receiver.arrived.set()
                if receiver.hold is not None and len(receiver.received) == 1:
                    receiver.hold.wait(60)
                failing = len(receiver.received) <= receiver.fail_first
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # concurrent dispatchers connect at once

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def ids(self) -> list[str]:
        return [r.headers["webhook-id"] for r in self.received]

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


# -- stores ------------------------------------------------------------------------------


@pytest.fixture
def db(db_target: str) -> str:
    """A journal's target: a SQLite file, or a fresh PostgreSQL schema (tests/stores.py)."""
    return db_target


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)


def rows(target: str, sql: str) -> list[tuple[Any, ...]]:
    if target.startswith("postgres"):
        import psycopg

        with psycopg.connect(target) as conn:
            return list(conn.execute(sql).fetchall())
    import sqlite3

    with sqlite3.connect(target) as conn:
        return conn.execute(sql).fetchall()


async def add_hook(j: Journal, url: str, events: tuple[str, ...] = (), fmt: str = "standard") -> str:
    hook = await outbox_of(j).add_webhook(
        url,
        events=events or ("ticket.opened", "ticket.decided", "ticket.expired"),
        format=fmt,
        secret_env="HOOK_SECRET",
        base_url="https://tether.example.com",
    )
    return hook.webhook_id


async def paused_run(
    j: Journal, run_id: str, *, expires_in: float = 3600, expected_seq: int | None = None
) -> str:
    """A run with one approval ticket opened by a commit (as a step that asks does)."""
    now = time.time()
    await j.create_run(
        RunRecord(
            run_id=run_id,
            workflow_name="refund",
            workflow_version="1",
            workflow_hash="sha256:wf",
            workflow_ref="tests",
            policy_hash="sha256:p",
            status="running",
            state="resolve",
            input={},
            checkpoint={},
            created_at=now,
            updated_at=now,
        ),
        [NewEntry("run_started", encode_json({}), None, None)],
    )
    run_ = await j.get_run(run_id)
    ticket_id = f"tkt_{run_id}"
    await j.commit(
        Commit(
            run_id=run_id,
            expected_seq=run_.last_seq if expected_seq is None else expected_seq,
            expected_hash=run_.last_hash,
            entries=[NewEntry("step", encode_json({"ask": 1}), "s1", "resolve")],
            new_tickets=[
                Ticket(
                    ticket_id=ticket_id,
                    run_id=run_id,
                    step_id="s1",
                    kind="approval",
                    subject="issue_refund",
                    args={"order_id": "A-1", "amount": 180.0, "card": "4111 1111 1111 1111"},
                    args_hash="sha256:args",
                    approver="supervisor",
                    created_at=now,
                    expires_at=now + expires_in,
                )
            ],
        )
    )
    return ticket_id


# -- signatures ----------------------------------------------------------------------------


def test_signatures_match_the_standard_webhooks_published_test_vector() -> None:
    # The vector of the specification's reference libraries (standard-webhooks/libraries).
    secret, msg_id, ts = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
    body = '{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = signature_headers(secret, msg_id, ts, body)
    assert headers == {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": expected}
    # The same by hand: base64 HMAC-SHA256 of "id.timestamp.body" under the decoded secret.
    key = base64.b64decode(secret.removeprefix("whsec_"))
    by_hand = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.{body}".encode(), hashlib.sha256).digest())
    assert expected == "v1," + by_hand.decode()


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with 'whsec_'"),
        ("whsec_not base64!", "does not decode"),
        ("whsec_" + base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
    ],
)
def test_a_malformed_secret_is_refused_naming_the_problem(secret: str, complaint: str) -> None:
    with pytest.raises(WebhookError, match=complaint):
        parse_secret(secret)
    assert len(parse_secret(generate_secret())) == 32


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    settings = DispatchSettings(base_delay=5, max_delay=3600)
    assert [backoff(n, settings, lambda: 1.0) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert [backoff(n, settings, lambda: 0.0) for n in (1, 2, 3)] == [2.5, 5, 10]
    assert backoff(30, settings, lambda: 1.0) == 3600
    # The defaults, as the README states them: 12 attempts over 1.2 to 2.4 hours.
    defaults = DispatchSettings()
    least = sum(backoff(n, defaults, lambda: 0.0) for n in range(1, defaults.max_attempts))
    most = sum(backoff(n, defaults, lambda: 1.0) for n in range(1, defaults.max_attempts))
    spans = [least, most]
    assert defaults.max_attempts == 12 and [round(s / 3600, 1) for s in spans] == [1.2, 2.4]


# -- the outbox, in the ticket's transaction -------------------------------------------------


def test_each_ticket_event_writes_one_row_per_subscribed_webhook_with_the_ticket(db: str) -> None:
    async def main() -> None:
        j = open_journal(db)
        try:
            everything = await add_hook(j, "https://a.example/hook")
            opened_only = await add_hook(j, "https://b.example/hook", ("ticket.opened",))
            gone = await add_hook(j, "https://c.example/hook")
            await outbox_of(j).remove_webhook(gone)
            decided = await paused_run(j, "r1")
            await j.decide_ticket(decided, approve=True, by="sup")
            expiring = await paused_run(j, "r2", expires_in=0.2)
            await asyncio.sleep(0.3)
            await j.expire_ticket(expiring)
            await j.expire_ticket(expiring)  # already expired: no second event
            with pytest.raises(TicketError):
                await j.decide_ticket(decided, approve=False, by="other")  # refused: no event
            found = {
                (d.event, d.ticket_id, d.webhook_id, d.ticket_status)
                for d in await outbox_of(j).list_deliveries()
            }
            assert found == {
                ("ticket.opened", decided, everything, "pending"),
                ("ticket.opened", decided, opened_only, "pending"),
                ("ticket.decided", decided, everything, "approved"),
                ("ticket.opened", expiring, everything, "pending"),
                ("ticket.opened", expiring, opened_only, "pending"),
                ("ticket.expired", expiring, everything, "expired"),
            }
        finally:
            await j.aclose()

    run(main())


def test_a_refused_commit_writes_no_notification(db: str) -> None:
    async def main() -> None:
        j = open_journal(db)
        try:
            await add_hook(j, "https://a.example/hook")
            with pytest.raises(ConcurrentWriteError):
                await paused_run(j, "r1", expected_seq=7)  # the run is not at seq 7
            assert await j.list_tickets() == []
            assert await outbox_of(j).list_deliveries() == []
        finally:
            await j.aclose()

    run(main())


def test_commits_grouped_in_one_transaction_each_notify_only_if_their_own_gate_passed(db: str) -> None:
    """Group commit: 20 runs open tickets at once (one transaction carries several commits),
    5 of them with a stale sequence number. Each refused commit writes no notification; each
    applied one writes its own. (Synced commits: SQLite applies a lone unsynced one at once.)"""

    async def main() -> None:
        j = open_journal(db, durability="full")
        try:
            await add_hook(j, "https://a.example/hook", ("ticket.opened",))
            outcomes = await asyncio.gather(
                *(paused_run(j, f"r{n}", expected_seq=9 if n % 4 == 0 else None) for n in range(20)),
                return_exceptions=True,
            )
            refused = {f"tkt_r{n}" for n in range(20) if n % 4 == 0}
            assert all(isinstance(outcomes[n], ConcurrentWriteError) for n in range(0, 20, 4))
            assert j.stats.transactions < j.stats.commits  # some commits shared a transaction
            notified = {d.ticket_id for d in await outbox_of(j).list_deliveries()}
            opened = {t.ticket_id for t in await j.list_tickets()}
            assert notified == opened == {f"tkt_r{n}" for n in range(20)} - refused
        finally:
            await j.aclose()

    run(main())


# -- delivery --------------------------------------------------------------------------------


def test_delivered_signed_with_the_ticket_run_and_inbox_link_but_not_the_arguments(
    db: str, receiver: Receiver
) -> None:
    async def main() -> None:
        j = open_journal(db)
        try:
            await add_hook(j, receiver.url)
            ticket_id = await paused_run(j, "r1")
            report = await deliver_due(outbox_of(j), settings=FAST)
            assert (report.claimed, report.delivered) == (1, 1)
            [got] = receiver.received
            assert got.valid, got.headers
            assert (
                got.headers["webhook-id"]
                == f"{ticket_id}.opened.{(await outbox_of(j).list_webhooks())[0].webhook_id}"
            )
            assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 30
            data = got.payload["data"]
            assert got.payload["type"] == "ticket.opened"
            assert data["link"] == f"https://tether.example.com/inbox/{ticket_id}"
            assert data["run"] == {
                "id": "r1",
                "workflow": "refund",
                "workflow_version": "1",
                "state": "resolve",
            }
            assert data["ticket"]["approver"] == "supervisor"
            assert data["ticket"]["status"] == "pending"
            assert "4111" not in got.body.decode() and "args" not in data["ticket"]
            [row] = await outbox_of(j).list_deliveries()
            assert (row.status, row.attempts, row.last_status) == ("delivered", 1, 204)
            # Nothing is due any more: a second pass sends nothing.
            assert (await deliver_due(outbox_of(j), settings=FAST)).claimed == 0
            assert len(receiver.received) == 1
        finally:
            await j.aclose()

    run(main())


def test_a_receiver_failing_twice_gets_the_same_message_id_on_the_third_attempt(
    db: str, receiver: Receiver
) -> None:
    receiver.fail_first = 2

    async def main() -> None:
        j = open_journal(db)
        try:
            await add_hook(j, receiver.url, ("ticket.opened",))
            await paused_run(j, "r1")
            outcomes = []
            deadline = time.time() + 20
            while len(outcomes) < 3 and time.time() < deadline:
                report = await deliver_due(outbox_of(j), settings=FAST)
                if report.claimed:
                    outcomes.append((report.retried, report.delivered))
                await asyncio.sleep(0.05)
            assert outcomes == [(1, 0), (1, 0), (0, 1)]
            assert len(set(receiver.ids())) == 1 and len(receiver.received) == 3
            assert all(r.valid for r in receiver.received)
            [row] = await outbox_of(j).list_deliveries()
            assert (row.status, row.attempts, row.last_status, row.last_error) == ("delivered", 3, 204, None)
        finally:
            await j.aclose()

    run(main())


def test_after_the_last_attempt_a_delivery_is_failed_and_shown_so(db: str, tmp_path: Path) -> None:
    receiver = Receiver(fail_first=100)
    try:

        async def main() -> None:
            j = open_journal(db)
            try:
                await add_hook(j, receiver.url, ("ticket.opened",))
                await paused_run(j, "r1")
                deadline = time.time() + 20
                while (
                    time.time() < deadline and (await outbox_of(j).list_deliveries())[0].status == "pending"
                ):
                    await deliver_due(outbox_of(j), settings=FAST)
                    await asyncio.sleep(0.05)
            finally:
                await j.aclose()

        run(main())
        assert len(receiver.received) == FAST.max_attempts
        shown = CliRunner().invoke(
            app, ["webhooks", "deliveries", "--status", "failed", "--json", "--db", db]
        )
        assert shown.exit_code == 0, shown.output
        [row] = json.loads(shown.output)
        assert (row["status"], row["attempts"], row["last_status"]) == ("failed", FAST.max_attempts, 500)
        assert row["last_error"].startswith("HTTP 500") and row["url"] == receiver.url
    finally:
        receiver.close()


def test_without_its_secret_a_webhook_is_not_called_unsigned(
    db: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        j = open_journal(db)
        try:
            await add_hook(j, receiver.url, ("ticket.opened",))
            await paused_run(j, "r1")
            monkeypatch.delenv("HOOK_SECRET")
            report = await deliver_due(outbox_of(j), settings=FAST)
            assert (report.claimed, report.retried) == (1, 1)
            [row] = await outbox_of(j).list_deliveries()
            assert row.status == "pending" and "$HOOK_SECRET" in (row.last_error or "")
            assert receiver.received == []
        finally:
            await j.aclose()

    run(main())


def test_concurrent_dispatchers_send_each_notification_once(db: str, receiver: Receiver) -> None:
    async def main() -> None:
        j = open_journal(db)
        try:
            await add_hook(j, receiver.url, ("ticket.opened",))
            for n in range(30):
                await paused_run(j, f"r{n}")
        finally:
            await j.aclose()
        # Four dispatchers, each with a journal of its own (as four processes would have).
        journals = [open_journal(db) for _ in range(4)]
        try:
            settings = DispatchSettings(batch=5, timeout=5.0)
            for _ in range(10):
                await asyncio.gather(*(deliver_due(outbox_of(x), settings=settings) for x in journals))
        finally:
            for x in journals:
                await x.aclose()

    run(main())
    assert len(receiver.received) == 30 and len(set(receiver.ids())) == 30


def test_slack_format_is_a_text_message_linking_to_the_inbox(db: str, receiver: Receiver) -> None:
    async def main() -> None:
        j = open_journal(db)
        try:
            await add_hook(j, receiver.url, ("ticket.opened", "ticket.decided"), fmt="slack")
            ticket_id = await paused_run(j, "r1")
            await j.decide_ticket(ticket_id, approve=False, by="sup", reason="amount <too> high")
            assert (await deliver_due(outbox_of(j), settings=FAST)).delivered == 2
        finally:
            await j.aclose()

    run(main())
    texts = sorted(r.payload["text"] for r in receiver.received)
    assert all(list(r.payload) == ["text"] for r in receiver.received)
    assert any("New approval of issue_refund for supervisor" in t for t in texts)
    assert any("denied by local:sup: amount &lt;too&gt; high" in t for t in texts)
    assert all(
        "<https://tether.example.com/inbox/tkt_r1|Open tkt_r1 in the tether inbox>" in t for t in texts
    )


# -- the command line ------------------------------------------------------------------------


def test_webhooks_add_refuses_what_it_cannot_deliver_safely(tmp_path: Path) -> None:
    db = str(tmp_path / "j.db")
    cli = CliRunner()
    base = ["--base-url", "https://tether.example.com", "--db", db]
    cases = {
        ("webhooks", "add", "https://x.example/h", *base): "a standard webhook is signed: give --secret-env",
        ("webhooks", "add", "ftp://x.example/h", "--secret-env", "HOOK_SECRET", *base): "http:// or https://",
        (
            "webhooks",
            "add",
            "https://x.example/h",
            "--secret-env",
            "HOOK_SECRET",
            "--events",
            "run.done",
            *base,
        ): ("not run.done"),
        (
            "webhooks",
            "add",
            "https://x.example/h",
            "--secret-env",
            "HOOK SECRET",
            *base,
        ): "environment variable's name",
        (
            "webhooks",
            "add",
            "https://x.example/h",
            "--secret-env",
            "HOOK_SECRET",
            "--db",
            db,
        ): "give --base-url",
    }
    for args, complaint in cases.items():
        result = cli.invoke(app, list(args), env={"TETHER_BASE_URL": ""})
        assert result.exit_code == 2, (args, result.output)
        assert complaint in result.output, (args, result.output)
    bad = cli.invoke(
        app, ["webhooks", "add", "https://x.example/h", "--secret-env", "BAD", *base], env={"BAD": "nope"}
    )
    assert bad.exit_code == 2 and "$BAD must start with 'whsec_'" in bad.output
    added = cli.invoke(
        app, ["webhooks", "add", "https://x.example/h", "--secret-env", "HOOK_SECRET", *base, "--json"]
    )
    assert added.exit_code == 0, added.output
    hook = json.loads(added.output)
    listed = cli.invoke(app, ["webhooks", "list", "--db", db, "--json"])
    assert [h["webhook_id"] for h in json.loads(listed.output)] == [hook["webhook_id"]]
    assert "secret" not in json.dumps(hook).replace("secret_env", "")  # the name only, never a secret
    removed = cli.invoke(app, ["webhooks", "remove", hook["webhook_id"], "--db", db])
    assert (
        removed.exit_code == 0
        and json.loads(cli.invoke(app, ["webhooks", "list", "--db", db, "--json"]).output) == []
    )


# -- crashes ---------------------------------------------------------------------------------

# A process that opens a ticket (the commit), says so, then waits before it would deliver: the
# test kills it there with SIGKILL, between the ticket's commit and the POST.
_OPEN_THEN_WAIT = """
import asyncio, sys
sys.path.insert(0, sys.argv[3])
from test_webhooks import add_hook, paused_run
from tether.journal import open_journal
from tether.webhooks import deliver_due, outbox_of

async def main():
    j = open_journal(sys.argv[1])
    await add_hook(j, sys.argv[2])
    ticket = await paused_run(j, "r1")
    print("committed", ticket, flush=True)
    sys.stdin.readline()  # killed here
    await deliver_due(outbox_of(j))

asyncio.run(main())
"""


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "HOOK_SECRET": SECRET}


def test_killed_between_the_ticket_commit_and_the_post_the_webhook_arrives_once_after_restart(
    db: str, receiver: Receiver
) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _OPEN_THEN_WAIT, db, receiver.url, str(Path(__file__).parent)],
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("committed"), line
        ticket_id = line.split()[1]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert receiver.received == []
    # Restarted: whatever delivers (here `tether webhooks deliver`, run twice) sends it once.
    for _ in range(2):
        again = subprocess.run(
            [sys.executable, "-m", "tether", "webhooks", "deliver", "--db", db],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert again.returncode == 0, again.stderr
    assert len(receiver.received) == 1
    [got] = receiver.received
    assert got.valid and got.payload["data"]["ticket"]["id"] == ticket_id
    assert got.payload["type"] == "ticket.opened"


def test_a_worker_killed_during_the_post_resends_the_same_id_and_the_refund_run_is_notified_once_per_event(
    db: str, tmp_path: Path
) -> None:
    """The refund example end to end: a worker pauses the run on an approval and POSTs
    ticket.opened; the receiver holds that request while the worker is killed with SIGKILL.
    A new worker sends it again after the dead one's claim lapses — the same webhook-id, a
    fresh valid signature — so a receiver that deduplicates on the id processes it once. The
    approval's ticket.decided follows, once."""
    hold = threading.Event()
    receiver = Receiver(hold=hold)
    env = {**_env(), "REFUND_LEDGER": str(tmp_path / "ledger.sqlite")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tether", *args, "--db", db],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    def worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "tether", "worker", "--db", db, "--workflows", str(REFUND)),
                *("--webhook-timeout", "1", "--lease", "2"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )

    try:
        hook = cli(
            "webhooks", "add", receiver.url, "--secret-env", "HOOK_SECRET", "--base-url", "https://t.example"
        )
        assert hook.returncode == 0, hook.stderr
        submitted = cli(
            "submit",
            str(REFUND),
            "--input",
            '{"order_id": "A-1001"}',
            "--model",
            f"script:{REFUND / 'proposals.json'}",
            "--json",
        )
        assert submitted.returncode == 0, submitted.stderr
        first = worker()
        try:
            assert receiver.arrived.wait(60), "the worker never POSTed ticket.opened"
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        hold.set()  # the receiver answers a dead connection
        second = worker()
        try:
            deadline = time.time() + 60
            while len(receiver.received) < 2 and time.time() < deadline:
                time.sleep(0.2)
            tickets = json.loads(cli("approvals", "--json").stdout)
            assert len(tickets) == 1, tickets
            approved = cli("approve", tickets[0]["ticket_id"], "--by", "supervisor")
            assert approved.returncode == 0, approved.stderr
            while len(receiver.received) < 3 and time.time() < deadline:
                time.sleep(0.2)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        receiver.close()
    assert all(r.valid for r in receiver.received), [r.headers for r in receiver.received]
    events = [(r.headers["webhook-id"], r.payload["type"]) for r in receiver.received]
    opened = [e for e in events if e[1] == "ticket.opened"]
    decided = [e for e in events if e[1] == "ticket.decided"]
    assert len(opened) == 2 and opened[0] == opened[1], events  # sent twice, the same id
    assert len(decided) == 1, events
    assert len(set(events)) == 2  # deduplicated by webhook-id: each event once
    shown = json.loads(cli("webhooks", "deliveries", "--json").stdout)
    assert sorted((d["event"], d["status"], d["attempts"]) for d in shown) == [
        ("ticket.decided", "delivered", 1),
        ("ticket.opened", "delivered", 2),
    ]


def test_a_worker_run_until_idle_sends_what_its_runs_notified_before_it_exits(
    tmp_path: Path, receiver: Receiver
) -> None:
    db = str(tmp_path / "journal.db")
    env = {**_env(), "REFUND_LEDGER": str(tmp_path / "ledger.sqlite")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tether", *args, "--db", db],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )

    added = cli(
        "webhooks", "add", receiver.url, "--secret-env", "HOOK_SECRET", "--base-url", "https://t.example"
    )
    assert added.returncode == 0, added.stderr
    model = f"script:{REFUND / 'proposals.json'}"
    assert cli("submit", str(REFUND), "--input", '{"order_id": "A-1001"}', "--model", model).returncode == 0
    worker = cli("worker", "--workflows", str(REFUND), "--until-idle")
    assert worker.returncode == 0, worker.stderr
    [got] = receiver.received  # delivered before the worker exited, not left for later
    assert got.valid and got.payload["type"] == "ticket.opened"
    assert got.payload["data"]["link"].startswith("https://t.example/inbox/tkt_")
    # With --no-webhooks a worker leaves notifications to other dispatchers.
    approved = cli("approve", got.payload["data"]["ticket"]["id"], "--by", "supervisor")
    assert approved.returncode == 0, approved.stderr
    assert cli("worker", "--workflows", str(REFUND), "--until-idle", "--no-webhooks").returncode == 0
    assert len(receiver.received) == 1
    pending = json.loads(cli("webhooks", "deliveries", "--status", "pending", "--json").stdout)
    assert [d["event"] for d in pending] == ["ticket.decided"]
