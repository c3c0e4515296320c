"""The CLI end to end, in real processes: run, pause, decide from another shell, resume, audit.

Every test gets its own journal (`--db` in tmp_path), its own refund ledger
(`$REFUND_LEDGER` in tmp_path) and runs with tmp_path as the working directory.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
REFUND = REPO / "examples" / "refund"
PROPOSALS = REFUND / "proposals.json"
CLI_FIXTURES = Path(__file__).parent / "fixtures" / "cli"
REFUND_INPUT = json.dumps({"order_id": "A-1001", "reason": "kettle arrived broken"})
REFUND_ARGS = {"order_id": "A-1001", "amount": 180.0, "reason": "kettle arrived broken"}
TIMEOUT = 30.0
T = TypeVar("T")


def flat(text: str) -> str:
    """Output with line wrapping undone, to look for phrases a person would read."""
    return " ".join(text.split())


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TETHER_DB", "FORCE_COLOR", "REFUND_LEDGER")}
    # A wide "terminal" so that long paths in messages are not folded in the middle.
    env |= {"REFUND_LEDGER": str(tmp_path / "ledger.sqlite"), "COLUMNS": "500", "NO_COLOR": "1"}
    return env


@dataclass
class Cli:
    """`python -m tether ...` against one journal, from tmp_path."""

    cwd: Path
    db: Path
    env: dict[str, str]

    def argv(self, args: tuple[str, ...]) -> list[str]:
        return [sys.executable, "-m", "tether", *args, "--db", str(self.db)]

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(args),
            cwd=self.cwd,
            env=env or self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(args),
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @property
    def ledger(self) -> Path:
        return Path(self.env["REFUND_LEDGER"])


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(cwd=tmp_path, db=tmp_path / "tether.db", env=cli_env(tmp_path))


def ledger_rows(path: Path) -> list[tuple[Any, ...]]:
    """The refunds the example's tool actually wrote (none if it never opened its ledger)."""
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'refunds'").fetchone() is None:
            return []
        return db.execute("SELECT idempotency_key, order_id, amount FROM refunds").fetchall()


def start_refund(cli: Cli) -> tuple[str, str]:
    """Run the refund example up to its approval; return (run id, ticket id)."""
    result = cli("run", str(REFUND), "--input", REFUND_INPUT, "--model", f"script:{PROPOSALS}", "--json")
    assert result.returncode == 0, result.stderr
    paused = json.loads(result.stdout)
    assert paused["status"] == "paused", paused
    assert paused["ticket_id"], paused
    return paused["run_id"], paused["ticket_id"]


def started_nothing(cli: Cli) -> bool:
    """No run in the journal; or no journal at all, when the command stopped before opening it."""
    return not cli.db.exists() or cli.json("runs") == []


def wait_for(probe: Callable[[], T | None], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen[str]]]:
    """Background processes started by a test; killed if the test leaves one running."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)


def steps_of(shown: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in shown["steps"] if row["kind"] == "step"]


def tool_rows(shown: dict[str, Any], tool: str) -> list[dict[str, Any]]:
    return [
        row
        for row in shown["steps"]
        if isinstance(row["proposal"], dict) and row["proposal"].get("tool") == tool
    ]


# -- the refund walkthrough ---------------------------------------------------------------


def test_refund_pauses_for_approval_and_completes_once_a_supervisor_approves(cli: Cli) -> None:
    started = cli("run", str(REFUND), "--input", REFUND_INPUT, "--model", f"script:{PROPOSALS}")
    assert started.returncode == 0, started.stderr
    assert "paused" in started.stdout

    runs = cli.json("runs")
    assert [r["status"] for r in runs] == ["paused"]
    run_id = runs[0]["run_id"]
    assert runs[0]["owner"] == "supervisor"
    assert run_id in started.stdout

    tickets = cli.json("approvals")
    assert len(tickets) == 1
    ticket = tickets[0]
    assert ticket["status"] == "pending"
    assert ticket["run_id"] == run_id
    assert ticket["subject"] == "issue_refund"
    assert ticket["args"] == REFUND_ARGS
    assert ticket["approver"] == "supervisor"
    ticket_id = ticket["ticket_id"]
    assert f"tether approve {ticket_id}" in flat(started.stdout)
    assert ledger_rows(cli.ledger) == []  # nothing is refunded while the run waits

    # While it is driven, each committed step is shown on stderr as it happens.
    progress = flat(started.stderr)
    assert 'lookup_order(order_id="A-1001") → allow by default:read → executed' in progress
    assert "→ deny by refund-over-hard-limit → refused (policy_denied)" in progress
    assert "→ ask by refund-above-100-needs-approval → awaiting_approval (approval_required)" in progress

    approved = cli("approve", ticket_id, "--by", "supervisor", "--reason", "photo checks out")
    assert approved.returncode == 0, approved.stderr
    assert f"ticket {ticket_id} approved" in flat(approved.stdout)
    assert cli.json("approvals") == []  # nothing pending any more

    resumed = cli("resume", run_id, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "completed" in resumed.stdout
    assert "issue_refund" not in resumed.stderr  # --quiet: no progress lines

    shown = cli.json("show", run_id)
    assert shown["run"]["status"] == "completed"
    assert shown["chain"] == {"intact": True, "problems": []}
    policy_hash = shown["run"]["policy_hash"]
    assert policy_hash.startswith("sha256:")
    assert all(row["decision"] for row in steps_of(shown)), "every step records its decision"
    decided = [row for row in shown["steps"] if row["decision"]]
    assert len(decided) >= 5
    for row in decided:
        assert row["rule_id"], row
        assert row["policy_hash"] == policy_hash, row

    refunds = tool_rows(shown, "issue_refund")
    denial = [r for r in refunds if r["proposal"]["args"]["amount"] == 650.0]
    assert len(denial) == 1
    assert denial[0]["decision"] == "deny"
    assert denial[0]["rule_id"] == "refund-over-hard-limit"
    assert denial[0]["reason_code"] == "policy_denied"
    assert denial[0]["outcome"] == "refused"

    asked = [r for r in refunds if r["outcome"] == "awaiting_approval"]
    assert len(asked) == 1
    assert asked[0]["decision"] == "ask"
    assert asked[0]["rule_id"] == "refund-above-100-needs-approval"
    assert asked[0]["ticket_id"] == ticket_id
    assert asked[0]["proposal"]["args"] == REFUND_ARGS

    decisions = [e["body"] for e in shown["entries"] if e["kind"] == "ticket_decided"]
    assert [(d["ticket_id"], d["status"], d["by"]["name"], d["reason"]) for d in decisions] == [
        (ticket_id, "approved", "supervisor", "photo checks out")
    ]
    # Decided from a shell that opened the journal: the local admin, `--by` only its display name.
    assert decisions[0]["by"]["principal_id"].startswith("local:") and decisions[0]["by"]["role"] == "admin"

    executed = [r for r in refunds if r["kind"] == "step" and r["outcome"] == "executed"]
    assert len(executed) == 1
    assert executed[0]["ticket_id"] == ticket_id
    assert executed[0]["result"] == {"refunded": 180.0, "order_id": "A-1001"}
    assert executed[0]["verification"]["ok"] is True

    rows = ledger_rows(cli.ledger)
    assert len(rows) == 1
    assert rows[0][1:] == ("A-1001", 180.0)

    # The ticket was used up by the refund it approved.
    [used] = cli.json("approvals", "--all")
    assert (used["ticket_id"], used["status"]) == (ticket_id, "consumed")

    # What a person reads: the rules by name and an intact journal.
    text = cli("show", run_id)
    assert text.returncode == 0, text.stderr
    human = flat(text.stdout)
    assert "journal intact" in human
    assert "deny by refund-over-hard-limit" in human
    assert "ask by refund-above-100-needs-approval" in human

    # A finished run cannot be resumed into doing anything again.
    again = cli("resume", run_id)
    assert again.returncode == 2
    assert "nothing to resume" in flat(again.stderr)
    assert len(ledger_rows(cli.ledger)) == 1


def test_run_wait_blocks_while_paused_and_finishes_after_approval_from_another_process(
    cli: Cli, reap: list[subprocess.Popen[str]]
) -> None:
    waiting = cli.popen(
        "run", str(REFUND), "--input", REFUND_INPUT, "--model", f"script:{PROPOSALS}", "--wait"
    )
    reap.append(waiting)

    def pending() -> dict[str, Any] | None:
        if waiting.poll() is not None:
            out, err = waiting.communicate()
            raise AssertionError(f"`run --wait` exited {waiting.returncode} early:\n{out}\n{err}")
        tickets = cli.json("approvals") if cli.db.exists() else []
        return tickets[0] if tickets else None

    ticket = wait_for(pending, timeout=20, what="the refund's approval ticket")
    assert ticket["args"] == REFUND_ARGS
    time.sleep(0.5)  # several of its polls later...
    assert waiting.poll() is None, "`run --wait` must keep waiting while the run is paused"
    assert [r["status"] for r in cli.json("runs")] == ["paused"]
    assert ledger_rows(cli.ledger) == []

    approved = cli("approve", ticket["ticket_id"], "--by", "supervisor")
    assert approved.returncode == 0, approved.stderr

    out, err = waiting.communicate(timeout=TIMEOUT)
    assert waiting.returncode == 0, err
    assert f"waiting for a decision on ticket {ticket['ticket_id']}" in flat(err)
    assert "completed" in out
    assert [r["status"] for r in cli.json("runs")] == ["completed"]
    assert len(ledger_rows(cli.ledger)) == 1


def test_a_denied_refund_is_not_paid_and_the_model_is_told_why(cli: Cli) -> None:
    run_id, ticket_id = start_refund(cli)

    denied = cli("deny", ticket_id, "--reason", "no photo of the damage", "--by", "supervisor")
    assert denied.returncode == 0, denied.stderr
    assert f"ticket {ticket_id} denied" in flat(denied.stdout)

    # A denied ticket cannot be approved afterwards.
    late = cli("approve", ticket_id, "--by", "supervisor")
    assert late.returncode == 2
    assert f"ticket {ticket_id} is already denied" in flat(late.stderr)

    resumed = cli("resume", run_id, "--json")
    result = json.loads(resumed.stdout)
    # The run goes on: the scripted model's next proposal is the `refunded` exit, which the
    # example's policy refuses without a verified refund; the script then has nothing left,
    # so the run escalates to the supervisor instead of claiming a refund it never made.
    assert resumed.returncode == 1, resumed.stderr
    assert (result["status"], result["state"], result["owner"]) == ("escalated", "resolve", "supervisor")

    shown = cli.json("show", run_id)
    [claim] = [row for row in shown["steps"] if (row["proposal"] or {}).get("kind") == "exit"]
    assert (claim["decision"], claim["rule_id"]) == ("deny", "refunded-only-when-verified")
    assert shown["chain"]["intact"] is True
    refusals = [row for row in shown["steps"] if row["reason_code"] == "approval_denied"]
    assert len(refusals) == 1
    refusal = refusals[0]
    assert refusal["decision"] == "deny"
    assert refusal["outcome"] == "refused"
    assert refusal["rule_id"] == f"approval:{ticket_id}"
    assert "no photo of the damage" in refusal["reason"]
    assert refusal["proposal"]["args"] == REFUND_ARGS
    # What the model observed is the refusal with the supervisor's reason.
    assert refusal["observation"]["reason_code"] == "approval_denied"
    assert "no photo of the damage" in refusal["observation"]["reason"]

    assert not [e for e in shown["entries"] if e["kind"] == "intent"], "no refund was attempted"
    assert not [r for r in tool_rows(shown, "issue_refund") if r["outcome"] == "executed"]
    assert ledger_rows(cli.ledger) == []
    [ticket] = cli.json("approvals", "--all")
    assert ticket["status"] == "denied"
    assert ticket["reason"] == "no photo of the damage"


def test_a_ticket_is_approved_once_and_cannot_be_denied_after_it_is_decided(cli: Cli) -> None:
    run_id, ticket_id = start_refund(cli)

    first = cli("approve", ticket_id, "--by", "supervisor")
    assert first.returncode == 0, first.stderr

    second = cli("approve", ticket_id, "--by", "supervisor")
    assert second.returncode == 2
    assert f"ticket {ticket_id} is already approved" in flat(second.stderr)
    assert "Traceback" not in second.stderr

    deny = cli("deny", ticket_id, "--reason", "changed my mind", "--by", "supervisor")
    assert deny.returncode == 2
    assert f"ticket {ticket_id} is already approved" in flat(deny.stderr)

    resumed = cli("resume", run_id, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "completed" in resumed.stdout
    assert "issue_refund" not in resumed.stderr  # --quiet: no progress lines
    assert len(ledger_rows(cli.ledger)) == 1  # one approval, one refund

    used = cli("approve", ticket_id, "--by", "supervisor")
    assert used.returncode == 2
    assert f"ticket {ticket_id} is already consumed" in flat(used.stderr)
    decided = [e for e in cli.json("show", run_id)["entries"] if e["kind"] == "ticket_decided"]
    assert len(decided) == 1, "refused decisions must not be journaled"


# -- bad input ----------------------------------------------------------------------------

SCRIPT = f"script:{PROPOSALS}"


@pytest.mark.parametrize(
    ("args", "messages"),
    [
        pytest.param(
            ["--input", '{"order_id": ', "--model", SCRIPT], ["--input is not JSON"], id="malformed-input"
        ),
        pytest.param(
            ["--input", '["A-1001"]', "--model", SCRIPT],
            ["--input must be a JSON object"],
            id="input-not-object",
        ),
        pytest.param(
            ["--input", REFUND_INPUT, "--model", "scrpit:x.json"],
            ["unknown model 'scrpit:x.json'", "Did you mean 'script'?"],
            id="model-prefix-typo",
        ),
        pytest.param(
            ["--input", REFUND_INPUT, "--model", "script:no-such-proposals.json"],
            ["script file not found", "no-such-proposals.json"],
            id="missing-script-file",
        ),
    ],
)
def test_bad_run_arguments_exit_2_with_a_specific_message_and_start_nothing(
    cli: Cli, args: list[str], messages: list[str]
) -> None:
    result = cli("run", str(REFUND), *args)

    assert result.returncode == 2, result.stdout + result.stderr
    for message in messages:
        assert message in flat(result.stderr)
    assert "Traceback" not in result.stderr
    assert started_nothing(cli)
    assert ledger_rows(cli.ledger) == []


@pytest.mark.parametrize(
    ("workflow", "messages"),
    [
        pytest.param("no-such-workflow", ["workflow not found", "no-such-workflow"], id="missing-workflow"),
        pytest.param(
            str(CLI_FIXTURES / "budget_typo"),
            ["budget_typo/workflow.yaml", "states.work.budget.max_step", "Extra inputs are not permitted"],
            id="unknown-field",
        ),
        pytest.param(
            str(CLI_FIXTURES / "duplicate_key"),
            ["duplicate_key/workflow.yaml", "duplicate key 'end'"],
            id="duplicate-key",
        ),
    ],
)
def test_a_missing_or_broken_workflow_exits_2_naming_the_problem_and_starts_nothing(
    cli: Cli, workflow: str, messages: list[str]
) -> None:
    result = cli("run", workflow, "--model", SCRIPT)

    assert result.returncode == 2, result.stdout + result.stderr
    for message in messages:
        assert message in flat(result.stderr)
    assert "Traceback" not in result.stderr
    assert started_nothing(cli)


# -- machine-readable output --------------------------------------------------------------


def test_listings_in_json_are_json(cli: Cli) -> None:
    assert cli("db", "upgrade").returncode == 0  # an empty journal
    for listing in ("runs", "approvals"):
        empty = cli(listing, "--json")
        assert empty.returncode == 0, empty.stderr
        assert json.loads(empty.stdout) == []

    run_id, ticket_id = start_refund(cli)

    runs = json.loads(cli("runs", "--json").stdout)
    assert [(r["run_id"], r["status"], r["workflow_name"]) for r in runs] == [(run_id, "paused", "refund")]
    assert "checkpoint" not in runs[0]
    tickets = json.loads(cli("approvals", "--json").stdout)
    assert [(t["ticket_id"], t["run_id"], t["kind"]) for t in tickets] == [(ticket_id, run_id, "approval")]


def test_json_output_stays_json_when_colour_is_forced(cli: Cli) -> None:
    """CI systems often set FORCE_COLOR=1; `--json` is for machines and must stay parseable."""
    start_refund(cli)
    coloured = {**cli.env, "FORCE_COLOR": "1"}
    coloured.pop("NO_COLOR")
    for listing in ("runs", "approvals"):
        result = cli(listing, "--json", env=coloured)
        assert result.returncode == 0, result.stderr
        assert "\x1b[" not in result.stdout, f"`{listing} --json` printed terminal colour codes"
        assert len(json.loads(result.stdout)) == 1


# -- one event loop per command -----------------------------------------------------------

PG = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
# `tether` with psycopg's pool counted: each command should build exactly one.
COUNTING_POOLS = """
import atexit, sys
import psycopg_pool

opened = []
original = psycopg_pool.AsyncConnectionPool.open

async def counted(self, *args, **kwargs):
    opened.append(self)
    return await original(self, *args, **kwargs)

psycopg_pool.AsyncConnectionPool.open = counted
atexit.register(lambda: sys.stderr.write(f"\\npools opened: {len(opened)}\\n"))
from tether.cli import app
app(prog_name="tether")
"""


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema in the test database, dropped afterwards."""
    try:
        import psycopg

        admin = psycopg.connect(PG, autocommit=True, connect_timeout=3)
    except Exception as exc:  # not installed, or no server
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"PostgreSQL not reachable at {PG}: CI must run the PostgreSQL tests") from exc
        pytest.skip(f"PostgreSQL not reachable at {PG} ({exc}); set TETHER_TEST_PG to a server URL")
    schema = f"tether_cli_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG}?options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def test_each_command_opens_one_postgresql_pool(cli: Cli, pg_url: str) -> None:
    def pools(*args: str) -> tuple[int, subprocess.CompletedProcess[str]]:
        result = subprocess.run(
            [sys.executable, "-c", COUNTING_POOLS, *args, "--db", pg_url],
            cwd=cli.cwd,
            env=cli.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        counted = [line for line in result.stderr.splitlines() if line.startswith("pools opened: ")]
        assert counted, result.stderr
        return int(counted[-1].removeprefix("pools opened: ")), result

    opened, started = pools(
        "run", str(REFUND), "--input", REFUND_INPUT, "--model", f"script:{PROPOSALS}", "--json"
    )
    assert started.returncode == 0, started.stderr
    assert opened == 1
    paused = json.loads(started.stdout)
    for command in (
        ("show", paused["run_id"], "--json"),
        ("runs",),
        ("approvals",),
        ("approve", paused["ticket_id"], "--by", "supervisor"),
        ("resume", paused["run_id"]),
        ("exchanges", paused["run_id"]),
    ):
        opened, result = pools(*command)
        assert result.returncode == 0, (command, result.stderr)
        assert opened == 1, command


def test_an_mcp_backed_run_starts_each_server_process_once(cli: Cli, tmp_path: Path) -> None:
    """The connection opened to list a server's tools at load is the one the run calls."""
    from mcp_servers import time_server

    starts = tmp_path / "starts.log"
    folder = tmp_path / "clock"
    folder.mkdir()
    command = ["sh", "-c", f'echo started >> {starts}; exec "$0" "$@"', *time_server()]
    workflow = {
        "name": "clock",
        "version": 1,
        "start": "ask",
        "mcp_servers": {"time": {"command": command}},
        "states": {
            "ask": {
                "kind": "agent",
                "instructions": "Tell the time.",
                "tools": ["mcp:time/get_current_time"],
                "exits": {"finish": "done"},
            },
            "done": {"kind": "terminal"},
        },
    }
    (folder / "workflow.yaml").write_text(json.dumps(workflow))
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps(
            [
                {"kind": "tool_call", "tool": "get_current_time", "args": {"timezone": "UTC"}},
                {"kind": "exit", "exit": "finish"},
            ]
        )
    )

    result = cli("run", str(folder), "--model", f"script:{script}", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "completed"
    executed = [r for r in json.loads(result.stdout)["steps"] if r["outcome"] == "executed"]
    assert len(executed) == 1
    assert starts.read_text().splitlines() == ["started"], "the server was started more than once"
