"""What auditing costs: the runtime's chain-is-truth check before it acts on a run, signing a
run's checkpoint, and `tether audit verify --all`, on a SQLite journal in a temporary folder.

Runs are the shop's: `--steps` read steps, then a refund that asks for approval (the run
pauses, as `tether resume` finds it). Printed: the median of `--repeat` timings.

* check before acting: `integrity.check_run` (reads the run's entries and the pending
  ticket, verifies every hash, compares the rows) — what `resume`, `pickup`, `resolve`
  and `migrate` pay once before acting; a step of a run being driven pays nothing.
* anchor check: `Auditor.check_anchor` (the latest signed checkpoint, its signature, the
  entries from its head on) — paid on top when a key is configured.
* sign a checkpoint: `Auditor.checkpoint_run` of a run's whole chain (its first checkpoint).
* verify --all: `audit.verify_journal` over every run, with the public key.

    python bench/audit.py [--runs 200] [--steps 10,100,1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import Shop, call
from tether import Budget, Runtime
from tether.audit import AuditKey, Auditor, verify_journal
from tether.journal import Journal, integrity, open_journal
from tether.models import ScriptedModel


async def paused_run(journal: Journal, steps: int) -> str:
    shop = Shop()
    budget = Budget(max_steps=steps + 5, max_tool_calls=steps + 5, max_repeats=steps + 5)
    workflow = shop.workflow(budget=budget)
    reads = [call("read_order", order_id="A1") for _ in range(steps)]
    model = ScriptedModel([*reads, call("refund", order_id="A1", amount=80.0)])
    result = await Runtime(journal).start(workflow, model, workflow_ref="bench")
    assert result.status == "paused", result
    return result.run_id


async def timed(fn: Callable[[], Awaitable[Any]], repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `repeat` calls (CPU: what a loaded machine hides)."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        await fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def ms(figures: tuple[float, float]) -> str:
    return f"{figures[0] * 1e3:.2f} ({figures[1] * 1e3:.2f})"


async def main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.steps.split(",")]
    key = AuditKey.generate()
    auditor = Auditor(key)
    print("milliseconds, median wall (CPU)")
    print(f"{'entries':>8} {'check before acting':>20} {'anchor check':>14} {'sign checkpoint':>16}")
    with tempfile.TemporaryDirectory() as d:
        journal = open_journal(str(Path(d) / "bench.db"))
        for n in sizes:
            run_id = await paused_run(journal, n)
            record = await journal.get_run(run_id)
            entries = len(await journal.read_entries(run_id))
            check = await timed(lambda r=record: integrity.check_run(journal, r, doing="bench"), args.repeat)
            await auditor.checkpoint_run(journal, run_id)
            anchor = await timed(
                lambda r=run_id: auditor.check_anchor(journal, r, doing="bench"), args.repeat
            )
            fresh = [await paused_run(journal, n) for _ in range(args.repeat)]
            sign = await timed(lambda f=fresh: auditor.checkpoint_run(journal, f.pop()), args.repeat)
            print(f"{entries:>8} {ms(check):>20} {ms(anchor):>14} {ms(sign):>16}")
        for _ in range(args.runs):
            await paused_run(journal, 8)
        total = len(await journal.run_ids())
        started = time.perf_counter()
        report = await verify_journal(journal, key=key)
        seconds = time.perf_counter() - started
        assert report.ok, report.findings[:3]
        print(
            f"verify --all: {report.runs} runs, {report.entries} entries, {report.checkpoints} checkpoints "
            f"in {seconds:.2f} s ({report.entries / seconds:,.0f} entries/s; {total} runs)"
        )
        journal.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="extra runs for verify --all (default 200)")
    parser.add_argument(
        "--steps", default="10,100,1000", help="read steps before the pause (default 10,100,1000)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
