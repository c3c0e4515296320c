"""What one governed read step costs in work done, not in time: counts that do not move with
the machine's load, so that a change to the step can be judged on a busy machine.

The loop is bench/step_overhead.py's tether read loop (one agent state, a 20-rule policy
of which 10 rules are evaluated per call, a read tool returning ~100 bytes, SQLite at
`synchronous=NORMAL`). Two counts, each the difference between a run of N and a run of 2N
steps divided by N (so the run's start and finish, imports and the journal's creation
cancel out):

* bytecodes per step: Python bytecode instructions executed (`sys.settrace` opcode events),
  by module and by function. What tether's own Python costs, in the unit it is written in.
* machine instructions per step (when valgrind is installed: Debian's `valgrind`):
  `valgrind --tool=callgrind` counts every instruction the process executes, by library
  (the interpreter, SQLite, the CEL engine, msgspec, OpenSSL, pydantic-core, libc). The
  same binary and input give the same count, whatever else the machine is doing.

Run:  .venv-bench/bin/python bench/step_instructions.py [--steps 200] [--top 15] [--no-valgrind]
(run it at two commits to compare them; nothing is asserted).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import step_overhead  # the loop measured is that script's
from benchkit import ROOT, describe_machine

from tether import Runtime, open_journal

SCRIPT = Path(__file__).resolve()
Key = tuple[str, str, int]  # (module path, function, first line)


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/src/", "python3.11/", "python3.12/", "python3.13/"):
        if marker in filename:
            return filename.split(marker)[-1]
    return filename


async def _run(path: Path, steps: int) -> None:
    journal = open_journal(str(path), durability="normal")
    workflow, model = step_overhead.tether_workflow("read", steps), step_overhead.scripted_proposer(steps)
    try:
        result = await Runtime(journal).start(workflow, model)
    finally:
        journal.close()
    if result.status != "completed":  # the loop must be right, or the counts mean nothing
        raise RuntimeError(f"the run ended {result.status}: {result.reason_code} {result.message}")


def bytecodes(tmp: Path, steps: int) -> tuple[dict[Key, float], dict[Key, float]]:
    """Bytecodes and calls per step, by function: (run of 2N − run of N) / N."""
    counts: Counter[Key] = Counter()
    calls: Counter[Key] = Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        key = (_short(code.co_filename), code.co_name, code.co_firstlineno)
        calls[key] += 1

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[key] += 1
            return local

        return local

    def traced(n: int) -> tuple[dict[Key, int], dict[Key, int]]:
        counts.clear()
        calls.clear()
        sys.settrace(tracer)
        try:
            asyncio.run(_run(tmp / f"traced-{n}.db", n))
        finally:
            sys.settrace(None)
        return dict(counts), dict(calls)

    asyncio.run(_run(tmp / "warm-up.db", 20))  # imports and one-time caches, not counted
    (c1, k1), (c2, k2) = traced(steps), traced(2 * steps)
    keys = set(c1) | set(c2)
    per_step = {k: (c2.get(k, 0) - c1.get(k, 0)) / steps for k in keys}
    calls_per_step = {k: (k2.get(k, 0) - k1.get(k, 0)) / steps for k in keys}
    return per_step, calls_per_step


def machine_instructions(steps: int) -> tuple[float, dict[str, float]] | None:
    """Instructions per step, in all and by library, from callgrind; None without valgrind."""
    if shutil.which("valgrind") is None:
        return None
    outputs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (steps, 2 * steps):
            out = Path(tmp) / f"callgrind.{n}"
            child = [sys.executable, str(SCRIPT), "--child", str(n)]
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *child]
            subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
            outputs.append(_by_library(out))
    (total1, libs1), (total2, libs2) = outputs
    libraries = {lib: (libs2.get(lib, 0) - libs1.get(lib, 0)) / steps for lib in set(libs1) | set(libs2)}
    return (total2 - total1) / steps, libraries


def _by_library(out: Path) -> tuple[int, dict[str, int]]:
    """The total and each shared object's own instructions, read with callgrind_annotate."""
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(out)], check=True, capture_output=True, text=True
    ).stdout
    total = int(re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", text).group(1).replace(",", ""))  # type: ignore[union-attr]
    libraries: Counter[str] = Counter()
    for line in text.splitlines():
        found = re.match(r"\s*([\d,]+) \([^)]*\)\s+.*\[(.+)\]\s*$", line)
        if found:
            where = found.group(2)  # a package's extension is named by its package (msgspec)
            package = where.split("site-packages/")[1].split("/")[0] if "site-packages/" in where else None
            name = package or Path(where).name
            libraries[re.sub(r"\.cpython-.*|\.so.*", "", name)] += int(found.group(1).replace(",", ""))
    return total, dict(libraries)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="N: runs of N and 2N steps are compared")
    parser.add_argument("--top", type=int, default=15, help="functions and modules shown")
    parser.add_argument("--no-valgrind", action="store_true", help="bytecodes only")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one run, under callgrind
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(_run(Path(tmp) / "child.db", args.child))
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print(describe_machine(tmp, ["msgspec", "pydantic", "cel-expr-python"]))
        per_step, calls = bytecodes(tmp, args.steps)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    print(f"tether read step, {args.steps} and {2 * args.steps} steps, at {git.stdout.strip() or '?'}\n")
    print(f"== Python bytecodes per step: {sum(per_step.values()):,.0f} ==")
    modules: Counter[str] = Counter()
    for (module, _, _), count in per_step.items():
        modules[module] += count  # type: ignore[assignment]
    print("| module | bytecodes/step |\n|---|---|")
    for module, count in modules.most_common(args.top):
        print(f"| {module} | {count:,.0f} |")
    print("\n| function | bytecodes/step | calls/step |\n|---|---|---|")
    for key, count in sorted(per_step.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {key[0]}:{key[2]} {key[1]} | {count:,.0f} | {calls[key]:.1f} |")
    counted = None if args.no_valgrind else machine_instructions(args.steps)
    if counted is None:
        print("\n(machine instructions: valgrind is not installed, or --no-valgrind)")
        return
    total, libraries = counted
    print(f"\n== machine instructions per step (callgrind): {total:,.0f} ==")
    print("| library | instructions/step |\n|---|---|")
    for library, count in sorted(libraries.items(), key=lambda kv: -kv[1])[: args.top]:
        if count >= 1000:
            print(f"| {library} | {count:,.0f} |")


if __name__ == "__main__":
    main()
