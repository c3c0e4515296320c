"""Racing approvers: two processes deciding the same ticket, 100 trials on SQLite and on
PostgreSQL. Exactly one decision is recorded every time; the other gets a conflict."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

from people_race import decide_all
from tether.journal import Commit, NewEntry, RunRecord, RunUpdate, Ticket, open_journal
from tether.journal import bodies as b

pytest_plugins = ("stores",)  # the db_target fixture: SQLite and PostgreSQL
TRIALS = 100


async def paused_runs(target: str, count: int) -> list[str]:
    """`count` runs, each paused on a pending approval ticket for `supervisor`."""
    tickets = []
    async with open_journal(target) as journal:
        for i in range(count):
            now = time.time()
            record = RunRecord(
                run_id=f"run_race{i}",
                workflow_name="shop",
                workflow_version="1",
                workflow_hash="sha256:wf",
                workflow_ref="tests",
                policy_hash="sha256:p",
                state="shop",
                status="running",
                created_at=now,
                updated_at=now,
            )
            started = b.RunStarted(workflow=b.WorkflowRef("shop", "1", "sha256:wf"), policy_hash="sha256:p")
            written = await journal.create_run(record, [NewEntry.of(started, state="shop")])
            ticket = Ticket(
                ticket_id=f"tkt_race{i}",
                run_id=record.run_id,
                step_id="s1",
                kind="approval",
                subject="refund",
                args={"amount": 70},
                args_hash="sha256:args",
                approver="supervisor",
                created_at=now,
                expires_at=now + 3600,
            )
            await journal.commit(
                Commit(
                    run_id=record.run_id,
                    expected_seq=written[-1].seq,
                    expected_hash=written[-1].hash,
                    update=RunUpdate(
                        status="paused", checkpoint={"pending": {"ticket_id": ticket.ticket_id}}
                    ),
                    new_tickets=[ticket],
                )
            )
            tickets.append(ticket.ticket_id)
    return tickets


def test_two_processes_deciding_the_same_ticket_record_exactly_one_decision(db_target: str) -> None:
    ticket_ids = asyncio.run(paused_runs(db_target, TRIALS))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=decide_all, args=(db_target, ticket_ids, n, barrier, results))
        for n in ("ann", "bo")
    ]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    errors = [o for seen in outcomes.values() for o in seen if o.startswith("error")]
    assert errors == []
    winners = {t: [n for n in outcomes if outcomes[n][i] == "won"] for i, t in enumerate(ticket_ids)}
    assert all(len(w) == 1 for w in winners.values()), winners
    both_tried = sum(1 for i in range(TRIALS) if {outcomes[n][i] for n in outcomes} == {"won", "conflict"})
    assert both_tried == TRIALS  # every trial had a winner and a loser

    async def recorded() -> None:
        async with open_journal(db_target) as journal:
            for ticket_id in ticket_ids:
                ticket = await journal.get_ticket(ticket_id)
                decided = [e for e in await journal.read_entries(ticket.run_id) if e.kind == "ticket_decided"]
                assert len(decided) == 1
                (winner,) = winners[ticket_id]
                assert ticket.decided_by == f"person:{winner}" == decided[0].body.by.principal_id  # type: ignore[union-attr]

    asyncio.run(recorded())
    won = {n: outcomes[n].count("won") for n in outcomes}
    print(f"\n{db_target.split(':')[0]}: {TRIALS} races, wins {won}")
