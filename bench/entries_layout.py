"""The `entries` table as a rowid table (today) against `WITHOUT ROWID`, on SQLite alone.

    python bench/entries_layout.py [--repeat 2]

Each row: R runs (random `run_…` ids, as tether makes them) each take S steps, interleaved
(run 1 step 1, run 2 step 1, …); a step is tether's transaction on a WAL file at
synchronous=NORMAL: BEGIN IMMEDIATE, the gated UPDATE of the run's row, the INSERT of one
entry (schema 9's row: its hash as 32 bytes, and a body of B bytes), COMMIT. µs per step,
of which the INSERT and the COMMIT; bytes per entry: growth of the file (WAL folded back
in) ÷ entries; and the table's pages from `dbstat`: interior, and unused bytes over all its
pages (the primary-key index included for the rowid table). No tether code runs: this isolates the layout.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sqlite3
import tempfile
import time
from pathlib import Path

RUNS = """CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT NOT NULL, last_seq INTEGER NOT NULL,
    last_hash TEXT NOT NULL, checkpoint TEXT NOT NULL, updated_at REAL NOT NULL)"""
ENTRIES = """CREATE TABLE entries (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, step_id TEXT,
    state TEXT, body TEXT NOT NULL, hash BLOB NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (run_id, seq))"""
UPDATE = """UPDATE runs SET last_seq = ?, last_hash = ?, checkpoint = ?, updated_at = ?
    WHERE run_id = ? AND last_seq = ?"""
HASH = "a" * 64  # a run's head, as its row keeps it (hex)
ENTRY_HASH = bytes(32)  # an entry's, as the entries table keeps it (raw)
# (body bytes, runs, steps per run)
CASES = ((300, 1, 20000), (300, 20, 1000), (300, 200, 100), (900, 200, 100), (3000, 200, 50))


def file_bytes(path: Path) -> int:
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return path.stat().st_size


def measure(tmp: Path, without_rowid: bool, body_len: int, runs: int, steps: int) -> str:
    path = tmp / f"{secrets.token_hex(4)}.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(RUNS)
    db.execute(ENTRIES + (" WITHOUT ROWID" if without_rowid else ""))
    empty = file_bytes(path)
    ids = ["run_" + secrets.token_hex(6) for _ in range(runs)]
    db.executemany("INSERT INTO runs VALUES (?, 'running', 0, '', '{}', 0)", [(r,) for r in ids])
    body = "x" * body_len
    insert = commit = 0.0
    clock = time.perf_counter
    started = clock()
    for seq in range(1, steps + 1):
        for run_id in ids:
            db.execute("BEGIN IMMEDIATE")
            db.execute(UPDATE, (seq, HASH, f'{{"steps": {seq}}}', time.time(), run_id, seq - 1))
            a = clock()
            row = (run_id, seq, "step", f"s{seq}", "work", body, ENTRY_HASH, time.time())
            db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            b = clock()
            db.execute("COMMIT")
            insert += b - a
            commit += clock() - b
    n = runs * steps
    per_step = (clock() - started) / n
    db.close()
    stored = (file_bytes(path) - empty) / n
    db = sqlite3.connect(path)
    interior, unused = db.execute(
        "SELECT sum(pagetype = 'internal'), sum(unused) FROM dbstat WHERE name LIKE '%entries%'"
    ).fetchone()
    db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    layout = "WITHOUT ROWID" if without_rowid else "rowid"
    return (
        f"| {layout} | {body_len} | {runs}×{steps} | {per_step * 1e6:.1f} | {insert / n * 1e6:.1f} | "
        f"{commit / n * 1e6:.1f} | {stored:,.0f} | {interior} | {unused / n:,.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"SQLite {sqlite3.sqlite_version}; load average {os.getloadavg()[0]:.2f}")
    print(
        "| layout | body B | runs×steps | µs/step | INSERT µs | COMMIT µs | bytes/entry | interior pages "
        "| unused B/entry |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="tether-layout-") as name:
        for body_len, runs, steps in CASES:
            for _ in range(args.repeat):
                for without_rowid in (False, True):
                    print(measure(Path(name), without_rowid, body_len, runs, steps), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
