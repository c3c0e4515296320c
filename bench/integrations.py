"""What governing an existing agent's tool calls costs: each framework integration against
the bare framework, one read tool, at tether's default durability (the SQLite journal).

Runs the three measurements one after the other, each in its own process (the frameworks
never share an interpreter), and prints their tables as they finish:

- bench/integrations_pydantic_ai.py   — PydanticAI: `Governance.wrap(toolset)` vs the toolset
- bench/integrations_openai_agents.py — OpenAI Agents SDK: `GovernedTools.tools` vs the tools
- bench/integrations_langgraph.py     — LangGraph: `GovernedToolNode` vs `ToolNode`

Each measures bare and governed interleaved and reports medians with their spread, and the
goal of issue 15 (under 1 ms of overhead per read-tool call). `--quick` runs fewer calls.

Run: python bench/integrations.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
    # script: (full arguments, --quick arguments)
    "integrations_pydantic_ai.py": (
        ["--calls", "20", "--runs", "10", "--repeat", "5"],
        ["--runs", "3", "--repeat", "3"],
    ),
    "integrations_openai_agents.py": (
        ["--calls", "20", "--runs", "10", "--repeat", "5"],
        ["--runs", "3", "--repeat", "3"],
    ),
    "integrations_langgraph.py": (["--calls", "300", "--repeat", "5"], ["--calls", "100", "--repeat", "3"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per measurement")
    quick = parser.parse_args().quick
    failed = []
    for script, (full, short) in SCRIPTS.items():
        print(f"\n## {script}\n", flush=True)
        done = subprocess.run([sys.executable, str(HERE / script), *(short if quick else full)])
        if done.returncode != 0:
            failed.append(script)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
