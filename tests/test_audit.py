"""The chain is the truth: 17 ways of tampering with a journal by direct SQL, on SQLite and on
PostgreSQL, each found and located by `tether audit verify`, never reported "intact" by
`tether show`, and refused by the runtime wherever it would otherwise act on it.

The run every case starts from: the shop's order A1 (total 200) is read (its total becomes a
fact), a refund of 180 asks the supervisor, who approves it (as `alice`), the refund is made
and the run finishes. Seq by seq:

    1 run_started  2 executed read_order  3 awaiting_approval  4 ticket_decided
    5 intent refund  6 executed refund  7 transition  8 run_finished

Runs are signed with an Ed25519 key (checkpoints at the pause, the decision and the end)
and every checkpoint also goes to a witness file. Row cases stop at the pause (seq 3) or
just after the decision (seq 4), where `tether resume` would act.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from conftest import Shop, call, run
from test_journal_contract import Store, postgres_url, store, with_schema  # noqa: F401 (fixtures)
from tether import Runtime
from tether.audit import AuditKey, Auditor, merkle_root, read_witness, verify_bundle, verify_journal
from tether.cli import app
from tether.errors import JournalTampered
from tether.hashing import encode_json
from tether.journal import Journal, integrity
from tether.journal.records import GENESIS_HASH, NewEntry, chain, entry_hash
from tether.models import ScriptedModel

cli = CliRunner()


class Scene:
    """One journal with the refund run in it, and the back door to its database."""

    def __init__(self, store: Store, tmp_path: Path) -> None:  # noqa: F811
        self.store = store
        self.key = AuditKey.generate()
        self.witness = tmp_path / "witness.jsonl"
        self.shop = Shop()
        self.shop.orders["A1"]["total"] = 200.0
        self.workflow = self.shop.workflow()
        self.model = ScriptedModel(
            [
                call("read_order", order_id="A1"),
                call("refund", order_id="A1", amount=180.0),
                {"kind": "finish"},
            ]
        )
        self.journal: Journal = store.open()
        self.auditor = Auditor(self.key, self.witness)
        self.runtime = Runtime(self.journal, auditor=self.auditor)
        self.run_id = ""
        self.ticket_id = ""

    def pause(self) -> None:
        result = run(self.runtime.start(self.workflow, self.model, workflow_ref="tests"))
        assert result.status == "paused", result
        self.run_id, self.ticket_id = result.run_id, str(result.ticket_id)

    def decide(self, approve: bool = True) -> None:
        run(self.journal.decide_ticket(self.ticket_id, approve=approve, by="alice", reason="ok"))
        run(self.auditor.checkpoint_run(self.journal, self.run_id))

    def finish(self) -> None:
        self.pause()
        self.decide()
        result = self.resume()
        assert result.status == "completed", result
        assert self.kinds() == [
            "run_started",
            "executed",
            "awaiting_approval",
            "ticket_decided",
            "intent",
            "executed",
            "transition",
            "run_finished",
        ]

    def resume(self) -> Any:
        return run(self.runtime.resume(self.run_id, self.workflow, self.model))

    def kinds(self) -> list[str]:
        return [e.kind for e in run(self.journal.read_entries(self.run_id))]

    # -- the back door ----------------------------------------------------------------

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.store.execute(statement.replace("?", self.store.ph), params)

    def unguarded(self, change: Callable[[], None]) -> None:
        """What an attacker with the database does: lift the append-only triggers, change
        the entries, put the triggers back as they were."""
        if self.store.kind == "sqlite":
            self.sql("DROP TRIGGER entries_no_update")
            self.sql("DROP TRIGGER entries_no_delete")
            change()
            self.sql(
                "CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries "
                "BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END"
            )
            self.sql(
                "CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries "
                "BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END"
            )
        else:
            self.sql("ALTER TABLE entries DISABLE TRIGGER USER")
            change()
            self.sql("ALTER TABLE entries ENABLE TRIGGER USER")

    def entry(self, seq: int) -> tuple[Any, ...]:
        """The entry at `seq` as (run_id, seq, kind, step_id, state, body, prev_hash, hash,
        created_at), hashes in hex: the link is the hash of the entry stored before it."""
        rows = self.sql(
            "SELECT run_id, seq, kind, step_id, state, body, hash, created_at FROM entries "
            "WHERE run_id = ? AND seq <= ? ORDER BY seq DESC LIMIT 2",
            self.run_id,
            seq,
        )
        prev = bytes(rows[1][6]).hex() if len(rows) > 1 else GENESIS_HASH
        *head, hash_, created_at = rows[0]
        return (*head, prev, bytes(hash_).hex(), created_at)

    def rehash_from(self, seq: int, edit: Callable[[str], str] = lambda body: body) -> None:
        """Rewrite the chain consistently from `seq` on (every later hash recomputed) and fix
        the row's head: nothing inside the database can tell."""
        rows = self.sql(
            "SELECT seq, kind, step_id, state, body, created_at FROM entries "
            "WHERE run_id = ? AND seq >= ? ORDER BY seq",
            self.run_id,
            seq,
        )
        prev = self.entry(seq)[6]

        def change() -> None:
            nonlocal prev
            for s, kind, step_id, state, body, created_at in rows:
                body = edit(body)
                h = entry_hash(self.run_id, s, kind, step_id, state, body, prev, created_at)
                self.sql(
                    "UPDATE entries SET body = ?, hash = ? WHERE run_id = ? AND seq = ?",
                    body,
                    bytes.fromhex(h),
                    self.run_id,
                    s,
                )
                prev = h

        self.unguarded(change)
        self.fix_head()

    def renumber(self, first: int, by: int) -> None:
        """Move entries from seq `first` on by `by` places (through a spare range: no clash)."""
        self.sql("UPDATE entries SET seq = seq + 1000 WHERE run_id = ? AND seq >= ?", self.run_id, first)
        self.sql("UPDATE entries SET seq = seq - 1000 + ? WHERE run_id = ? AND seq >= 1000", by, self.run_id)

    def fix_head(self) -> None:
        seq, hash_ = self.sql(
            "SELECT seq, hash FROM entries WHERE run_id = ? ORDER BY seq DESC LIMIT 1", self.run_id
        )[0]
        self.sql(
            "UPDATE runs SET last_seq = ?, last_hash = ? WHERE run_id = ?",
            seq,
            bytes(hash_).hex(),
            self.run_id,
        )

    def forge(self, seq: int, prev_hash: str, kind: str, body: dict[str, Any]) -> None:
        """Write an entry with a correct hash for where it is put, after `prev_hash`."""
        text = encode_json(body)
        at = self.entry(1)[8]
        h = entry_hash(self.run_id, seq, kind, "s9", "shop", text, prev_hash, at)
        self.sql(
            "INSERT INTO entries (run_id, seq, kind, step_id, state, body, hash, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            self.run_id,
            seq,
            kind,
            "s9",
            "shop",
            text,
            bytes.fromhex(h),
            at,
        )

    # -- what finds it -------------------------------------------------------------------

    def verify(self, *, key: bool = True) -> Any:
        journal = self.store.open()
        return run(
            verify_journal(journal, [self.run_id], key=self.key if key else None, witness=self.witness)
        )

    def show_problems(self) -> list[str]:
        shown = cli.invoke(app, ["show", self.run_id, "--db", self.store.target, "--json"])
        assert shown.exit_code == 0, shown.output
        chain = json.loads(shown.stdout)["chain"]
        assert chain["intact"] is (not chain["problems"])
        problems: list[str] = chain["problems"]
        return problems

    def refuses(self, runtime: Runtime | None = None) -> JournalTampered:
        """A fresh process resuming the run is refused, and nothing was executed."""
        executed = list(self.shop.executed)
        runtime = runtime or Runtime(self.store.open(), auditor=self.auditor)
        with pytest.raises(JournalTampered) as refused:
            run(runtime.resume(self.run_id, self.workflow, self.model))
        assert self.shop.executed == executed
        assert "journal_tampered" in str(refused.value)
        return refused.value


@pytest.fixture
def scene(store: Store, tmp_path: Path) -> Iterator[Scene]:  # noqa: F811 (the imported fixture)
    yield Scene(store, tmp_path)


def first(report: Any) -> Any:
    """The first damage verify names for the run (findings come first bad first)."""
    assert not report.ok
    return report.findings[0]


# -- the untouched run ---------------------------------------------------------------


def test_an_untouched_run_verifies_and_is_signed_at_every_stop(scene: Scene) -> None:
    scene.finish()
    report = scene.verify()
    assert report.ok, report.findings
    assert report.warnings == []
    assert scene.show_problems() == []
    signed = [json.loads(c.body)["seq"] for c in read_witness(scene.witness)]
    assert signed == [3, 4, 8]  # the pause, the decision, the end
    assert report.checkpoints == 3


# -- the chain (a finished run) --------------------------------------------------------


def check(scene: Scene, kind: str, seq: int | None, *, runtime_refuses: bool = True) -> None:
    report = scene.verify()
    found = first(report)
    assert (found.kind, found.seq) == (kind, seq), report.findings
    assert scene.show_problems() or kind in ("edited", "truncated", "inserted")
    if runtime_refuses:
        scene.refuses()


def test_an_edited_entry_is_found_where_it_is(scene: Scene) -> None:
    scene.finish()
    scene.unguarded(
        lambda: scene.sql(
            "UPDATE entries SET body = replace(body, '180.0', '18.0') WHERE run_id = ? AND seq = 6",
            scene.run_id,
        )
    )
    check(scene, "edited", 6)
    assert scene.show_problems()


def test_a_deleted_entry_is_found_missing(scene: Scene) -> None:
    scene.finish()
    scene.unguarded(lambda: scene.sql("DELETE FROM entries WHERE run_id = ? AND seq = 5", scene.run_id))
    check(scene, "deleted", 5)
    assert scene.show_problems()


def test_an_entry_put_in_the_middle_is_found_inserted(scene: Scene) -> None:
    scene.finish()
    prev = scene.entry(4)[7]

    def change() -> None:
        scene.renumber(5, 1)
        scene.forge(5, prev, "executed", {"tool": "refund", "args": {"order_id": "A1", "amount": 500.0}})

    scene.unguarded(change)
    scene.fix_head()
    check(scene, "inserted", 5)
    assert scene.show_problems()


def test_reordered_entries_are_found_reordered(scene: Scene) -> None:
    scene.finish()

    def change() -> None:
        scene.sql("UPDATE entries SET seq = 100 WHERE run_id = ? AND seq = 5", scene.run_id)
        scene.sql("UPDATE entries SET seq = 5 WHERE run_id = ? AND seq = 6", scene.run_id)
        scene.sql("UPDATE entries SET seq = 6 WHERE run_id = ? AND seq = 100", scene.run_id)

    scene.unguarded(change)
    check(scene, "reordered", 5)
    assert scene.show_problems()


def test_a_truncated_tail_is_found_against_the_row(scene: Scene) -> None:
    scene.finish()
    scene.unguarded(lambda: scene.sql("DELETE FROM entries WHERE run_id = ? AND seq >= 6", scene.run_id))
    report = scene.verify(key=False)  # even without the key: the row still records seq 8
    assert (first(report).kind, first(report).seq) == ("truncated", 6)
    check(scene, "truncated", 6)
    assert scene.show_problems()


def test_a_truncated_tail_with_the_head_fixed_is_found_against_the_signed_checkpoint(scene: Scene) -> None:
    scene.finish()
    scene.unguarded(lambda: scene.sql("DELETE FROM entries WHERE run_id = ? AND seq >= 6", scene.run_id))
    scene.fix_head()
    # The attacker makes the row say what the chain says: running, after the intent.
    scene.sql("UPDATE runs SET status = 'running' WHERE run_id = ?", scene.run_id)
    check(scene, "truncated", 6)
    # What tether would do next is re-run the refund (or leave it in doubt): it refuses.
    assert scene.shop.refunds == [("A1", 180.0)]


def test_an_entry_cut_out_with_the_rest_renumbered_and_the_head_fixed_is_found_deleted(scene: Scene) -> None:
    scene.finish()

    def change() -> None:
        scene.sql("DELETE FROM entries WHERE run_id = ? AND seq = 5", scene.run_id)
        scene.renumber(6, -1)

    scene.unguarded(change)
    scene.fix_head()
    check(scene, "deleted", 5)
    assert scene.show_problems()


def test_a_consistent_rewrite_from_one_entry_on_is_found_against_the_signed_checkpoint(scene: Scene) -> None:
    scene.finish()
    scene.rehash_from(5, lambda body: body.replace("180.0", "18.0"))
    # The chain and the rows agree: only the checkpoints (signed outside the database) tell.
    assert all("checkpoint" in f.message for f in scene.verify(key=False).findings)
    check(scene, "edited", 5)
    found = first(scene.verify())
    assert "rewritten" in found.message


def test_a_forged_entry_appended_with_a_correct_hash_is_found_beyond_the_head(scene: Scene) -> None:
    scene.finish()
    scene.forge(
        9, scene.entry(8)[7], "executed", {"tool": "refund", "args": {"order_id": "A1", "amount": 500.0}}
    )
    report = scene.verify(key=False)
    assert (first(report).kind, first(report).seq) == ("inserted", 9)
    check(scene, "inserted", 9)
    assert scene.show_problems()


def test_a_forged_append_with_the_head_fixed_is_found_after_the_signed_end(scene: Scene) -> None:
    scene.finish()
    scene.forge(
        9, scene.entry(8)[7], "executed", {"tool": "refund", "args": {"order_id": "A1", "amount": 500.0}}
    )
    scene.fix_head()
    check(scene, "inserted", 9)


# -- the rows (a paused run: resuming would act) --------------------------------------------


def row_check(scene: Scene, says: str) -> None:
    refused = scene.refuses()
    assert says in str(refused)
    assert any(f.kind == "row_disagrees" for f in refused.findings)
    report = scene.verify()
    assert any(f.kind == "row_disagrees" and says in f.message for f in report.findings), report.findings
    assert any(says in p for p in scene.show_problems())
    assert scene.shop.refunds == []


def test_a_ticket_whose_decider_was_edited_is_not_acted_on(scene: Scene) -> None:
    scene.pause()
    scene.decide()
    scene.sql("UPDATE tickets SET decided_by = 'mallory' WHERE ticket_id = ?", scene.ticket_id)
    row_check(scene, "decided_by 'mallory'")


def test_a_run_whose_facts_were_edited_is_not_resumed(scene: Scene) -> None:
    scene.pause()
    scene.decide()
    scene.sql(
        "UPDATE run_values SET value = ? WHERE run_id = ? AND name = 'facts'",
        '{"order_total":100000.0}',
        scene.run_id,
    )
    row_check(scene, "facts differ from the chain's (order_total)")


def test_a_run_whose_owner_was_edited_is_not_resumed(scene: Scene) -> None:
    scene.pause()
    scene.sql("UPDATE runs SET owner = 'mallory' WHERE run_id = ?", scene.run_id)
    row_check(scene, "owner is 'mallory'")


def test_a_ticket_approved_by_sql_is_never_executed(scene: Scene) -> None:
    scene.pause()
    scene.sql(
        "UPDATE tickets SET status = 'approved', decided_by = 'mallory', decided_at = created_at "
        "WHERE ticket_id = ?",
        scene.ticket_id,
    )
    row_check(scene, "approved, but no decision of it is in the chain")


def test_a_denied_ticket_flipped_to_approved_is_never_executed(scene: Scene) -> None:
    scene.pause()
    scene.decide(approve=False)
    scene.sql("UPDATE tickets SET status = 'approved' WHERE ticket_id = ?", scene.ticket_id)
    row_check(scene, "approved, but the chain records it denied")
    # Set back to pending to be decided again by someone friendlier: refused too.
    scene.sql("UPDATE tickets SET status = 'pending' WHERE ticket_id = ?", scene.ticket_id)
    with pytest.raises(JournalTampered, match="pending, but the chain records it denied"):
        run(scene.store.open().decide_ticket(scene.ticket_id, approve=True, by="mallory"))


def test_a_paused_run_whose_chain_is_broken_is_not_resumed(scene: Scene) -> None:
    scene.pause()
    scene.decide()
    scene.unguarded(
        lambda: scene.sql(
            "UPDATE entries SET body = replace(body, '200.0', '20.0') WHERE run_id = ? AND seq = 2",
            scene.run_id,
        )
    )
    refused = scene.refuses()
    assert (refused.findings[0].kind, refused.findings[0].seq) == ("edited", 2)
    assert (first(scene.verify()).kind, first(scene.verify()).seq) == ("edited", 2)
    assert scene.show_problems()
    assert scene.shop.refunds == []


def test_a_forged_decision_with_a_correct_hash_and_agreeing_rows_is_refused_with_the_key(
    scene: Scene,
) -> None:
    scene.pause()
    awaiting = scene.entry(3)
    ticket = run(scene.journal.get_ticket(scene.ticket_id))
    decided = {
        "ticket_id": scene.ticket_id,
        "status": "approved",
        "by": "supervisor",
        "args_hash": ticket.args_hash,
    }
    scene.forge(4, awaiting[7], "ticket_decided", decided)
    scene.sql(
        "UPDATE tickets SET status = 'approved', decided_by = 'supervisor', decided_at = ? "
        "WHERE ticket_id = ?",
        scene.entry(4)[8],
        scene.ticket_id,
    )
    scene.fix_head()
    # Chain and rows agree: inside the database this is a decision like any other.
    assert scene.verify(key=False).ok
    # But nobody holding the key signed it: verify says so, and the runtime does not act on it.
    found = first(scene.verify())
    assert (found.kind, found.seq) == ("inserted", 4)
    refused = scene.refuses()
    assert (refused.findings[0].kind, refused.findings[0].seq) == ("inserted", 4)
    assert "nobody signed" in str(refused)
    assert scene.shop.refunds == []


# -- the triggers ------------------------------------------------------------------------------


def test_append_only_triggers_dropped_or_disabled_are_found_at_every_opening(scene: Scene) -> None:
    scene.pause()
    scene.decide()
    if scene.store.kind == "sqlite":
        scene.sql("DROP TRIGGER entries_no_delete")  # whoever can write the file can
        gone = "trigger entries_no_delete on entries is gone"
    else:
        scene.sql("ALTER TABLE entries DISABLE TRIGGER entries_no_update_or_delete")  # the app's own role can
        gone = "trigger entries_no_update_or_delete on entries is disabled"
    reopened = scene.store.open()
    assert [f.message for f in reopened.trigger_problems] == [gone]
    # Fail closed: nothing is acted on or written while the triggers are gone.
    refused = scene.refuses(Runtime(reopened, auditor=scene.auditor))
    assert gone in str(refused)
    report = scene.verify()
    assert [(f.kind, f.message) for f in report.findings] == [("triggers_missing", gone)]
    assert any(gone in p for p in scene.show_problems())
    # Verified sound otherwise: the operator puts the triggers back and the run goes on.
    restored = cli.invoke(app, ["audit", "restore-triggers", "--db", scene.store.target])
    assert restored.exit_code == 0, restored.output
    assert scene.store.open().trigger_problems == []
    assert scene.verify().ok
    result = run(
        Runtime(scene.store.open(), auditor=scene.auditor).resume(scene.run_id, scene.workflow, scene.model)
    )
    assert result.status == "completed"
    assert scene.shop.refunds == [("A1", 180.0)]


# -- the command line, the journal root, the witness, the bundle ----------------------------------


def test_tether_audit_verify_exits_non_zero_and_names_the_first_bad_entry(
    scene: Scene, tmp_path: Path
) -> None:
    scene.finish()
    key_file = tmp_path / "audit.key"
    made = cli.invoke(app, ["audit", "keygen", "--out", str(key_file), "--json"])
    assert made.exit_code == 0, made.output
    public = tmp_path / "audit.key.pub"
    (tmp_path / "signer.pub").write_text(scene.key.public_pem())
    good = cli.invoke(
        app, ["audit", "verify", "--all", "--db", scene.store.target, "--key", str(tmp_path / "signer.pub")]
    )
    assert good.exit_code == 0, good.output
    assert "verified: no damage found" in good.stdout
    # Signed with another key than the one given: every checkpoint is refused.
    other = cli.invoke(
        app, ["audit", "verify", scene.run_id, "--db", scene.store.target, "--key", str(public)]
    )
    assert other.exit_code == 1
    assert "signed by key" in other.stdout
    scene.rehash_from(6, lambda body: body.replace('"ok":true', '"ok":false'))
    bad = cli.invoke(
        app,
        [
            "audit",
            "verify",
            scene.run_id,
            "--db",
            scene.store.target,
            "--key",
            str(tmp_path / "signer.pub"),
            "--json",
        ],
    )
    assert bad.exit_code == 1
    found = json.loads(bad.stdout)["findings"][0]
    assert (found["kind"], found["seq"], found["run_id"]) == ("edited", 6, scene.run_id)


def test_a_signed_journal_root_anchors_runs_that_never_stopped_and_the_witness_finds_deleted_checkpoints(
    scene: Scene,
) -> None:
    scene.pause()
    other = Scene.__new__(Scene)  # a second run in the same journal, not signed by the runtime
    root = run(scene.auditor.checkpoint_journal(scene.journal))
    values = json.loads(root.body)
    assert values["root"] == merkle_root([tuple(r) for r in values["runs"]])  # type: ignore[misc]
    assert [r[0] for r in values["runs"]] == [scene.run_id]
    del other
    # The attacker rewrites the run consistently, then deletes its run checkpoints too.
    scene.rehash_from(2, lambda body: body.replace("200.0", "2000.0"))
    if scene.store.kind == "sqlite":
        scene.sql("DROP TRIGGER checkpoints_no_delete")
        scene.sql("DELETE FROM checkpoints WHERE kind = 'run'")
        scene.sql(
            "CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints "
            "BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END"
        )
    else:
        scene.sql("ALTER TABLE checkpoints DISABLE TRIGGER USER")
        scene.sql("DELETE FROM checkpoints WHERE kind = 'run'")
        scene.sql("ALTER TABLE checkpoints ENABLE TRIGGER USER")
    report = scene.verify()
    kinds = {(f.kind, f.seq) for f in report.findings}
    assert ("edited", 3) in kinds  # the journal root signed the head (seq 3) as it was
    assert any(f.kind == "deleted" and "witness line 1" in f.message for f in report.findings)


def test_an_exported_bundle_verifies_offline_and_finds_an_edit(scene: Scene, tmp_path: Path) -> None:
    scene.finish()
    bundle = tmp_path / "bundle.jsonl"
    exported = cli.invoke(
        app, ["audit", "export", scene.run_id, "--db", scene.store.target, "--out", str(bundle)]
    )
    assert exported.exit_code == 0, exported.output
    lines = [json.loads(line) for line in bundle.read_text().splitlines()]
    assert [line["type"] for line in lines].count("entry") == 8
    assert {"key", "checkpoint", "ticket", "run"} <= {line["type"] for line in lines}
    assert next(line for line in lines if line["type"] == "key")["fingerprint"] == scene.key.fingerprint
    public = tmp_path / "signer.pub"
    public.write_text(scene.key.public_pem())
    ok = cli.invoke(app, ["audit", "verify", "--bundle", str(bundle), "--key", str(public)])
    assert ok.exit_code == 0, ok.output
    # The bundle's holder edits it consistently (hashes recomputed): the signature tells.
    entries = [line for line in lines if line["type"] == "entry"]
    prev = entries[4]["prev_hash"]
    for line in entries[4:]:
        line["body_json"] = line["body_json"].replace("180.0", "18.0")
        line["prev_hash"] = prev
        line["hash"] = prev = entry_hash(
            line["run_id"],
            line["seq"],
            line["kind"],
            line["step_id"],
            line["state"],
            line["body_json"],
            prev,
            line["created_at"],
        )
    report = verify_bundle(lines, AuditKey.from_pem(public.read_text()))
    assert (first(report).kind, first(report).seq) == ("edited", 5)


def test_show_says_intact_only_when_the_rows_agree_with_the_chain(journal: Journal, tmp_path: Path) -> None:
    shop = Shop()
    model = ScriptedModel([call("refund", order_id="A1", amount=80.0)])
    result = run(Runtime(journal).start(shop.workflow(), model, workflow_ref="tests"))
    target = str(tmp_path / "journal.db")
    shown = cli.invoke(app, ["show", result.run_id, "--db", target])
    assert "journal intact" in shown.stdout
    db = sqlite3.connect(target, isolation_level=None)
    db.execute("UPDATE tickets SET status = 'approved', decided_by = 'mallory'")
    db.close()
    shown = cli.invoke(app, ["show", result.run_id, "--db", target])
    assert "journal intact" not in shown.stdout
    assert "BROKEN" in shown.stdout and "no decision of it is in the chain" in shown.stdout


# -- in real processes: the refund example, signed from the command line ---------------------------

REPO = Path(__file__).resolve().parents[1]
REFUND = REPO / "examples" / "refund"
REFUND_INPUT = json.dumps({"order_id": "A-1001", "reason": "kettle arrived broken"})


def test_the_command_line_signs_refuses_a_ticket_approved_by_sql_and_exports_a_bundle(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env |= {"REFUND_LEDGER": str(tmp_path / "ledger.sqlite"), "COLUMNS": "500", "NO_COLOR": "1"}
    db = str(tmp_path / "tether.db")

    def tether(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tether", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = tether("audit", "keygen", "--out", "audit.key")
    assert made.returncode == 0, made.stderr
    assert oct((tmp_path / "audit.key").stat().st_mode)[-3:] == "600"
    signed = ("--audit-key", "audit.key")
    script = f"script:{REFUND / 'proposals.json'}"

    def paused_run() -> tuple[str, str]:
        started = tether(
            *signed, "run", str(REFUND), "--input", REFUND_INPUT, "--model", script, "--db", db, "--json"
        )
        assert started.returncode == 0, started.stderr
        result = json.loads(started.stdout)
        assert result["status"] == "paused"
        return result["run_id"], result["ticket_id"]

    # Approved by SQL, not by a person: resume refuses, nothing is refunded.
    forged_run, forged_ticket = paused_run()
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE tickets SET status = 'approved', decided_by = 'supervisor', decided_at = created_at "
            "WHERE ticket_id = ?",
            (forged_ticket,),
        )
    refused = tether(*signed, "resume", forged_run, "--db", db, "--json")
    assert refused.returncode == 2
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "journal_tampered"
    assert "no decision of it is in the chain" in error["message"]
    assert refunds(tmp_path / "ledger.sqlite") == []

    # A person's approval, signed; the run completes and verifies with the public key.
    run_id, ticket_id = paused_run()
    approved = tether(*signed, "approve", ticket_id, "--by", "supervisor", "--db", db)
    assert approved.returncode == 0, approved.stderr
    resumed = tether(*signed, "resume", run_id, "--db", db)
    assert resumed.returncode == 0, resumed.stderr
    assert len(refunds(tmp_path / "ledger.sqlite")) == 1
    verified = tether("audit", "verify", run_id, "--key", "audit.key.pub", "--db", db, "--json")
    assert verified.returncode == 0, verified.stdout
    report = json.loads(verified.stdout)
    assert report["ok"] and report["checkpoints"] >= 3 and report["warnings"] == []
    everything = tether("audit", "verify", "--all", "--key", "audit.key.pub", "--db", db)
    assert everything.returncode == 1  # the forged approval is still in the journal
    assert f"{forged_run}: ticket {forged_ticket}" in flat(everything.stdout)

    exported = tether("audit", "export", run_id, "--db", db)
    assert exported.returncode == 0, exported.stderr
    (tmp_path / "bundle.jsonl").write_text(exported.stdout)
    sources = [json.loads(line) for line in exported.stdout.splitlines() if '"type": "source"' in line]
    assert [s["role"] for s in sources] == ["workflow", "policy"]  # the files, by their SHA-256
    assert sources[1]["text"] == (REFUND / "policy.yaml").read_text()
    offline = tether("audit", "verify", "--bundle", "bundle.jsonl", "--key", "audit.key.pub")
    assert offline.returncode == 0, offline.stdout
    assert "verified: no damage found" in offline.stdout


def flat(text: str) -> str:
    return " ".join(text.split())


def refunds(ledger: Path) -> list[tuple[Any, ...]]:
    """The refunds the example's tool wrote (none if it never opened its ledger)."""
    if not ledger.exists():
        return []
    with sqlite3.connect(ledger) as db:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'refunds'").fetchone() is None:
            return []
        return db.execute("SELECT * FROM refunds").fetchall()


# -- the chain's diagnostics without a stored link (schema 9), on entries in memory ---------------


def chained(count: int) -> list[Any]:
    return chain("run_x", 0, GENESIS_HASH, [NewEntry("step_done", f'{{"n":{n}}}') for n in range(count)], 1.0)


def stored(entries: list[Any]) -> list[Any]:
    """The entries as a read gives them: renumbered where they sit, each linked to the one
    stored before it (the link is not stored: a read takes it from there)."""
    out, prev = [], GENESIS_HASH
    for e in entries:
        out.append(msgspec.structs.replace(e, prev_hash=prev))
        prev = e.hash
    return out


def at(entries: list[Any], seq: int) -> list[Any]:
    return [msgspec.structs.replace(e, seq=s) for s, e in enumerate(entries, start=seq)]


def test_an_entry_replaced_and_rehashed_in_place_is_found_at_the_link_it_breaks() -> None:
    entries = chained(8)
    old = entries[4]  # seq 5
    body = old.body_json.replace("4", "40")
    forged = msgspec.structs.replace(
        old,
        body_json=body,
        hash=entry_hash("run_x", 5, old.kind, None, None, body, entries[3].hash, old.created_at),
    )
    found = integrity.chain_findings("run_x", stored([*entries[:4], forged, *entries[5:]]))
    # Without a stored link, seq 6 not chaining from seq 5 is all the chain says: one of
    # the two changed. It names both, at the first entry it cannot place.
    assert [(f.kind, f.seq) for f in found] == [("edited", 6)]
    assert "seq 5 before it" in found[0].message


def test_an_entry_copied_from_elsewhere_in_the_run_is_found_where_it_was_written() -> None:
    entries = chained(8)
    copied = [*entries[:6], msgspec.structs.replace(entries[2], seq=7), *entries[7:]]
    found = integrity.chain_findings("run_x", stored(copied))
    assert found[0].kind == "inserted" and "written as seq 3 (now seq 7)" in found[0].message
    assert ("edited", 8) in [(f.kind, f.seq) for f in found]  # it no longer follows seq 7


def test_a_tail_whose_predecessor_is_missing_is_found_deleted() -> None:
    entries = chained(6)
    tail = [msgspec.structs.replace(e, prev_hash="" if e.seq == 4 else e.prev_hash) for e in entries[3:]]
    assert [(f.kind, f.seq) for f in integrity.chain_findings("run_x", tail, whole=False)] == [("deleted", 3)]
    assert integrity.chain_findings("run_x", entries[3:], whole=False) == []


def test_a_long_tail_shifted_by_one_insertion_is_told_in_linear_time(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = chained(3000)
    forged = msgspec.structs.replace(entries[10], body_json='{"n":-1}', hash="ab" * 32)
    shifted = stored([*entries[:10], forged, *at(entries[10:], 12)])
    calls = 0

    def counting(*args: Any) -> str:
        nonlocal calls
        calls += 1
        return entry_hash(*args)

    monkeypatch.setattr(integrity, "entry_hash", counting)
    found = integrity.chain_findings("run_x", shifted)
    assert [(f.kind, f.seq) for f in found] == [("edited", 11), ("inserted", 11)]
    # The 2,990 entries after it are each placed after the one before it (about one hash
    # each), not tried at every place they could have been written at.
    assert calls < 5 * 3000
