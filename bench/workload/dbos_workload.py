"""The benchmark workloads for DBOS Transact, and its configuration at each durability.

`run_sync`/`run_async`: the same shape as workflow.yaml, each step a `@DBOS.step`: three
reads, one write, one finishing step, five checkpointed steps per workflow, the same number
of governed steps a tether run of the workload takes (bench/throughput.py). `run_steps`: N
steps each returning about 100 bytes, to measure the bytes a step stores
(bench/step_overhead.py). Imported only by the DBOS child processes of those scripts (DBOS
is one instance per process).
"""

from __future__ import annotations

import sqlite3
from typing import Any, ClassVar

from dbos import DBOS

PAYLOAD = "x" * 80
QUEUE = "bench"
SQLITE_SYNC = {"full": "FULL", "normal": "NORMAL"}
PG_SYNC = {"full": "on", "normal": "off"}


class WalConnection(sqlite3.Connection):
    """A SQLite connection in WAL mode at a chosen `synchronous` level, as tether's journal runs.

    DBOS on SQLite uses the rollback journal with synchronous FULL; given this class as the
    driver's connection factory it runs in WAL mode like tether, so that the two sides
    differ in nothing but their own code. What each connection found is kept in `seen`.
    """

    synchronous: ClassVar[str] = "FULL"
    seen: ClassVar[set[tuple[str, int]]] = set()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA journal_mode=WAL")
        self.execute(f"PRAGMA synchronous={self.synchronous}")
        mode = self.execute("PRAGMA journal_mode").fetchone()[0]
        sync = self.execute("PRAGMA synchronous").fetchone()[0]
        WalConnection.seen.add((mode, sync))


def config(
    url: str, *, executor: str, durability: str, schema: str | None = None, application_name: str = "bench"
) -> dict[str, Any]:
    """A DBOS configuration on `url` at `durability`.

    SQLite: "default" is DBOS as shipped (rollback journal, synchronous FULL); "full" and
    "normal" are WAL mode at synchronous FULL or NORMAL (see WalConnection). PostgreSQL:
    "full" keeps `synchronous_commit` on, "normal" sets it off for every connection (tether's
    "normal" still syncs its intents; DBOS has no such mixed mode). `application_name` tags
    its PostgreSQL sessions, so that their server processes can be found.
    """
    cfg: dict[str, Any] = {
        "name": "bench",
        "system_database_url": url,
        "log_level": "WARNING",
        "application_version": "bench-1",
        "executor_id": executor,
    }
    if schema:
        cfg["dbos_system_schema"] = schema
    if url.startswith("sqlite") and durability != "default":
        level = SQLITE_SYNC[durability]
        factory = type(f"Wal{level}", (WalConnection,), {"synchronous": level})
        cfg["db_engine_kwargs"] = {"connect_args": {"factory": factory}}
    elif not url.startswith("sqlite"):
        options = f"-c synchronous_commit={PG_SYNC[durability]} -c application_name={application_name}"
        cfg["db_engine_kwargs"] = {"connect_args": {"options": options}}
    return cfg


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


@DBOS.workflow()
def run_steps(n: int) -> int:
    for i in range(n):
        lookup(i)
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
