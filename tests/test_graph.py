"""`tether graph`: Mermaid and SVG drawings of a workflow, its envelopes and gates, and the
path a run took; the README and docs show the examples as the command draws them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFUND = REPO / "examples" / "refund"
BROKEN = Path(__file__).parent / "fixtures" / "broken_workflows"
SVG = "{http://www.w3.org/2000/svg}"


def tether(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"], "COLUMNS": "400", "NO_COLOR": "1", "PYTHONPATH": str(REPO / "src")}
        | (env or {}),
    )


def graph(*args: str) -> str:
    done = tether("graph", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_mermaid_graph_shows_state_kinds_envelopes_and_gates() -> None:
    text = graph(str(REFUND))
    assert text.startswith("flowchart TD\n")
    assert 's0["<b>intake</b><br/>step refund_tools:intake"]:::step' in text
    agent = next(line for line in text.splitlines() if "<b>resolve</b>" in line)
    assert agent.strip().startswith('s1("') and agent.endswith(":::agent")
    for part in (
        "• lookup_order (read, verified)",
        "• issue_refund (write, verified; deny, ask supervisor)",
        "exits: refunded, declined",
        "budget: 8 steps, 4 tool calls, 60 s",
        "escalates to supervisor",
    ):
        assert part in agent
    assert 's3(["<b>rejected</b><br/>terminal, failed"]):::failed' in text
    assert 's1 -->|"refunded: deny by refunded-only-when-verified"| s2' in text
    assert "classDef visited" in text and "class " not in text.split("classDef visited")[1]


def test_an_exit_policy_always_denies_is_drawn_dashed() -> None:
    text = graph(str(BROKEN / "unreachable_terminal"))
    assert '-.->|"archive: always denied (never-archive)"|' in text


def test_the_svg_is_self_contained_deterministic_and_distinguishes_state_kinds() -> None:
    first, second = graph(str(REFUND), "--format", "svg"), graph(str(REFUND), "--format", "svg")
    assert first == second
    root = ET.fromstring(first)
    assert root.tag == f"{SVG}svg"
    assert not [e for e in root.iter() if e.get("href") or e.get("{http://www.w3.org/1999/xlink}href")]
    kinds = {g.get("class") for g in root.iter(f"{SVG}g")}
    assert {"state step", "state agent", "state terminal", "state failed"} <= kinds
    texts = {t.text for t in root.iter(f"{SVG}text")}
    assert {"resolve", "agent", "• issue_refund (write, verified; deny, ask supervisor)"} <= texts


def test_a_run_s_path_is_highlighted(tmp_path: Path) -> None:
    env = {"REFUND_LEDGER": str(tmp_path / "ledger.sqlite")}
    db = str(tmp_path / "journal.db")
    unknown_order = json.dumps({"order_id": "Z-9"})
    script = f"script:{REFUND / 'proposals.json'}"
    done = tether(
        "run", str(REFUND), "--input", unknown_order, "--model", script, "--db", db, "--json", env=env
    )
    run_id = json.loads(done.stdout)["run_id"]
    text = graph(str(REFUND), "--run", run_id, "--db", db)
    # intake rejected the unknown order: start → intake → rejected, never resolve.
    assert "class s0,s3 visited" in text
    links = [line for line in text.splitlines() if line.startswith("  s") and "--" in line]
    taken = re.search(r"linkStyle ([\d,]+) ", text)
    assert taken is not None and taken.group(1) == "0,2"
    assert links[0] == "  start --> s0" and links[2] == "  s0 --> s3"
    svg = ET.fromstring(graph(str(REFUND), "--run", run_id, "--db", db, "--format", "svg"))
    visited = [g for g in svg.iter(f"{SVG}g") if "visited" in (g.get("class") or "")]
    assert [g.find(f"{SVG}text").text for g in visited] == ["intake", "rejected"]  # type: ignore[union-attr]


def test_a_run_of_another_workflow_is_bad_input(tmp_path: Path) -> None:
    env = {"REFUND_LEDGER": str(tmp_path / "ledger.sqlite")}
    db = str(tmp_path / "journal.db")
    script = f"script:{REFUND / 'proposals.json'}"
    done = tether(
        "run", str(REFUND), "--input", '{"order_id": "Z-9"}', "--model", script, "--db", db, "--json", env=env
    )
    run_id = json.loads(done.stdout)["run_id"]
    other = tether("graph", str(BROKEN / "unbounded_cycle"), "--run", run_id, "--db", db)
    assert other.returncode == 2
    assert f"run {run_id} is a run of workflow refund, not unbounded-cycle" in other.stderr


def test_the_readme_and_docs_show_the_examples_as_tether_graph_draws_them() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```mermaid\n(.*?)```", readme, re.S)
    for example in ("refund", "retail"):
        assert graph(str(REPO / "examples" / example)) in blocks, f"README's {example} graph is out of date"
        svg = (REPO / "docs" / f"{example}-graph.svg").read_text()
        assert svg == graph(str(REPO / "examples" / example), "--format", "svg"), f"docs/{example}-graph.svg"
