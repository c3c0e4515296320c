"""`tether diff`: pairs of versions report exactly the intended changes in autonomy surface,
from folders or git revisions; with a journal, exactly the recorded decisions that flip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REFUND = REPO / "examples" / "refund"
RETAIL = REPO / "examples" / "retail"


def tether(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PATH": os.environ["PATH"], "COLUMNS": "400", "NO_COLOR": "1", "PYTHONPATH": str(REPO / "src")}
        | (env or {}),
    )


def diff_json(*args: str) -> dict[str, Any]:
    done = tether("diff", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def changes(report: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(c["kind"], c["subject"], c["direction"]) for c in report["changes"]}


def copy(source: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite", "*.db"))
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_the_same_version_twice_has_no_change(tmp_path: Path) -> None:
    report = diff_json(str(REFUND), str(copy(REFUND, tmp_path, "same")))
    assert report["changes"] == []


def test_raising_an_approval_threshold_is_reported_as_more_permissive_for_exactly_those_calls(
    tmp_path: Path,
) -> None:
    new = copy(REFUND, tmp_path, "v2")
    edit(new / "policy.yaml", "when: args.amount > 100.0", "when: args.amount > 200.0")
    report = diff_json(str(REFUND), str(new))
    assert changes(report) == {
        ("rule-edited", "rule refund-above-100-needs-approval", "more permissive"),
        ("decision", "tool issue_refund (write)", "more permissive"),
    }
    decision = next(c for c in report["changes"] if c["kind"] == "decision")
    assert "calls with 100.0 < args.amount <= 200.0" in decision["text"]
    assert "ask (supervisor) by refund-above-100-needs-approval" in decision["text"]
    assert "→ allow by refund-small" in decision["text"]
    rule = next(c for c in report["changes"] if c["kind"] == "rule-edited")
    assert "narrowed: holds for fewer calls" in rule["text"]


def test_envelope_budget_effect_verifier_and_escalation_changes_are_each_reported(tmp_path: Path) -> None:
    new = copy(REFUND, tmp_path, "v3")
    workflow = new / "workflow.yaml"
    edit(workflow, "declined: rejected", "declined: rejected\n      escalated: rejected")
    edit(workflow, "max_tool_calls: 4", "max_tool_calls: 2")
    edit(workflow, "escalate_to: supervisor", "escalate_to: finance")
    edit(workflow, "start: intake", "start: intake\nbudget: {max_steps: 40}")
    edit(workflow, "- refund_tools:lookup_order\n", "")
    edit(
        new / "refund_tools.py",
        '@tool(effect="write", idempotent=True, verify=refund_recorded)',
        '@tool(effect="write", idempotent=True)',
    )
    report = diff_json(str(REFUND), str(new))
    assert changes(report) == {
        ("tool-removed", "state resolve", "less permissive"),
        ("exit-added", "state resolve", "more permissive"),
        ("budget-lowered", "state resolve", "less permissive"),
        ("escalation-changed", "state resolve", "changed"),
        ("budget-lowered", "workflow", "less permissive"),
        ("verifier-removed", "tool issue_refund", "more permissive"),
    }
    texts = [c["text"] for c in report["changes"]]
    assert "resolve: tool lookup_order (read) removed from the envelope" in texts
    assert "resolve: exit escalated → rejected added" in texts
    assert "resolve: budget max_tool_calls lowered: 4 → 2" in texts
    assert "run budget max_steps lowered: no limit → 40" in texts
    assert "resolve: escalate_to supervisor → finance" in texts


def test_rule_additions_approver_changes_and_default_changes_show_in_the_decisions(tmp_path: Path) -> None:
    new = copy(REFUND, tmp_path, "v4")
    policy = new / "policy.yaml"
    edit(policy, "approver: supervisor", "approver: manager")
    edit(policy, "version: 1\n", "version: 1\ndefaults: {exit: ask}\n")
    edit(
        policy,
        "  - id: refund-small\n",
        "  - id: tiny-refunds-are-denied\n    tool: issue_refund\n    when: args.amount < 1.0\n"
        "    decision: deny\n\n  - id: refund-small\n",
    )
    report = diff_json(str(REFUND), str(new))
    assert changes(report) == {
        ("default-changed", "policy defaults", "less permissive"),
        ("rule-edited", "rule refund-above-100-needs-approval", "changed"),
        ("rule-added", "rule tiny-refunds-are-denied", "less permissive"),
        ("decision", "tool issue_refund (write)", "changed"),
        ("decision", "tool issue_refund (write)", "less permissive"),
        ("decision", "exit declined", "less permissive"),
        ("decision", "exit refunded", "less permissive"),
    }
    decisions = {c["text"] for c in report["changes"] if c["kind"] == "decision"}
    assert any(
        "calls with args.amount < 1.0" in t and "→ deny by tiny-refunds-are-denied" in t for t in decisions
    )
    assert any("ask (supervisor)" in t and "→ ask (manager)" in t for t in decisions)
    assert any(
        t.startswith("exit declined in resolve, every proposal: allow by default:exit → ask")
        for t in decisions
    )


def test_markdown_output_is_ready_for_a_pull_request(tmp_path: Path) -> None:
    new = copy(REFUND, tmp_path, "md")
    edit(new / "policy.yaml", "when: args.amount > 100.0", "when: args.amount > 200.0")
    done = tether("diff", str(REFUND), str(new), "--markdown")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("### Autonomy diff: refund 1")
    assert "**2 more permissive, 0 less permissive, 0 changed**" in done.stdout
    assert "#### More permissive" in done.stdout


def git(folder: Path, *args: str) -> None:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, env=os.environ | env)


def test_two_git_revisions_of_one_folder_compare_like_two_folders(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    folder = copy(REFUND, repo, "refund")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "v1")
    edit(folder / "policy.yaml", "when: args.amount > 100.0", "when: args.amount > 200.0")
    git(repo, "commit", "-qam", "v2")
    by_revisions = diff_json(str(folder), "--from", "HEAD~1", "--to", "HEAD")
    assert changes(by_revisions) == {
        ("rule-edited", "rule refund-above-100-needs-approval", "more permissive"),
        ("decision", "tool issue_refund (write)", "more permissive"),
    }
    assert by_revisions["old"]["source"].startswith(f"{folder} at HEAD~1 (")
    # Without --to, the working tree is the new version.
    edit(folder / "workflow.yaml", "max_steps: 8", "max_steps: 9")
    assert changes(diff_json(str(folder), "--from", "HEAD")) == {
        ("budget-raised", "state resolve", "more permissive")
    }


def test_an_unknown_revision_is_bad_input_naming_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    folder = copy(REFUND, repo, "refund")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "v1")
    done = tether("diff", str(folder), "--from", "no-such-rev")
    assert done.returncode == 2
    assert "no-such-rev" in done.stderr


def test_diff_needs_two_versions() -> None:
    done = tether("diff", str(REFUND))
    assert done.returncode == 2
    assert "give two workflows (OLD NEW), or one with --from REV" in done.stderr


# -- recorded proposals -------------------------------------------------------------------------------


def run_refund(tmp_path: Path, db: Path) -> str:
    env = {"REFUND_LEDGER": str(tmp_path / "ledger.sqlite")}
    script = f"script:{REFUND / 'proposals.json'}"
    request = json.dumps({"order_id": "A-1001", "reason": "kettle arrived broken"})
    started = tether(
        "run", str(REFUND), "--input", request, "--model", script, "--db", str(db), "--json", env=env
    )
    result = json.loads(started.stdout)
    tether("approve", result["ticket_id"], "--by", "supervisor", "--db", str(db), env=env)
    resumed = tether("resume", result["run_id"], "--db", str(db), "--json", env=env)
    assert json.loads(resumed.stdout)["status"] == "completed", resumed.stdout
    return str(result["run_id"])


def test_with_a_journal_exactly_the_recorded_decisions_that_flip_are_listed(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    run_id = run_refund(tmp_path, db)
    new = copy(REFUND, tmp_path, "v2")
    edit(new / "policy.yaml", "when: args.amount > 100.0", "when: args.amount > 200.0")
    report = diff_json(str(REFUND), str(new), "--journal", str(db))
    journal = report["journal"]
    # lookup_order, the refund of 650 (denied), the refund of 180 (asked), the exit.
    assert journal["summary"] == {"changed": 1, "same": 3, "not decidable": 0, "not re-decided": 0}
    [flip] = journal["changed"]
    assert (flip["run_id"], flip["proposal"]["args"]["amount"], flip["direction"]) == (
        run_id,
        180.0,
        "more permissive",
    )
    assert (flip["recorded"]["decision"], flip["recorded"]["rule_id"]) == (
        "ask",
        "refund-above-100-needs-approval",
    )
    assert (flip["decision"]["decision"], flip["decision"]["rule_id"]) == ("allow", "refund-small")


LIMITS = """\
name: limits
version: 1
start: pay
resolvers: {{limit: limit_resolvers:limit}}
states:
  pay:
    kind: agent
    instructions: Pay.
    tools: [limit_resolvers:pay]
    exits: {{paid: done}}
  done: {{kind: terminal}}
"""
LIMIT_TOOLS = """\
from tether import tool


def limit(ctx, who: str) -> float:
    return 50.0


@tool(effect="write", idempotent=True)
def pay(who: str, amount: float) -> str:
    '''Pay someone.'''
    return who
"""


def test_a_resolver_call_not_recorded_is_not_decidable_and_never_called(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, who in ((old, "args.who"), (new, '"everyone"')):
        folder.mkdir()
        (folder / "workflow.yaml").write_text(LIMITS.format())
        (folder / "limit_resolvers.py").write_text(LIMIT_TOOLS)
        (folder / "policy.yaml").write_text(
            "rules:\n"
            f"  - {{id: within-limit, tool: pay, when: 'args.amount <= limit({who})', decision: allow}}\n"
        )
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps([{"kind": "tool_call", "tool": "pay", "args": {"who": "ann", "amount": 20.0}}])
    )
    db = tmp_path / "journal.db"
    tether("run", str(old), "--model", f"script:{script}", "--db", str(db))
    # The new version's resolver would raise if it were called.
    (new / "limit_resolvers.py").write_text(
        LIMIT_TOOLS.replace("return 50.0", "raise RuntimeError('called')")
    )
    report = diff_json(str(old), str(new), "--journal", str(db))
    [undecided] = report["journal"]["not_decidable"]
    assert undecided["proposal"]["tool"] == "pay"
    assert 'limit("everyone")' in undecided["note"]
    same = diff_json(str(old), str(old), "--journal", str(db))["journal"]["summary"]
    assert same["not decidable"] == 0 and same["same"] >= 1
