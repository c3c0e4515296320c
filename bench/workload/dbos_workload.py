"""The throughput workload for DBOS Transact: the same shape as workflow.yaml, each step a `@DBOS.step`.

Three reads, one write, one finishing step: five checkpointed steps per workflow, the
same number of governed steps a tether run of the workload takes. Imported only by the
DBOS child processes of bench/throughput.py (DBOS is one instance per process).
"""

from __future__ import annotations

from typing import Any

from dbos import DBOS

PAYLOAD = "x" * 80
QUEUE = "bench"


@DBOS.step()
def lookup(i: int) -> dict[str, Any]:
    return {"i": i, "payload": PAYLOAD}


@DBOS.step()
def record(i: int, key: str) -> dict[str, Any]:
    return {"i": i, "key": key}


@DBOS.step()
def finish(n: int) -> dict[str, Any]:
    return {"finished": n}


@DBOS.workflow()
def run_sync(n: int) -> int:
    for i in (1, 2, 3):
        lookup(i)
    record(1, f"{DBOS.workflow_id}:s4")
    finish(n)
    return n


@DBOS.step()
async def lookup_async(i: int) -> dict[str, Any]:
    return {"i": i, "payload": PAYLOAD}


@DBOS.step()
async def record_async(i: int, key: str) -> dict[str, Any]:
    return {"i": i, "key": key}


@DBOS.step()
async def finish_async(n: int) -> dict[str, Any]:
    return {"finished": n}


@DBOS.workflow()
async def run_async(n: int) -> int:
    for i in (1, 2, 3):
        await lookup_async(i)
    await record_async(1, f"{DBOS.workflow_id}:s4")
    await finish_async(n)
    return n
