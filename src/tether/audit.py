"""Anchored heads: signed checkpoints of each run's chain, a journal-wide Merkle root, a
witness file, and the verification and export of what the journal holds (`tether audit`).

A hash chain proves that its entries were not changed *one at a time*; whoever can write the
database can still rewrite a run consistently from any entry on, or cut its tail and fix the
head its row records. A checkpoint anchors the chain outside the database's power: its body
names a run's head (seq, hash) and the hash of every entry since the run's previous
checkpoint, and it is signed with an Ed25519 key that is kept in a file, not in the database
(`tether audit keygen`). With the key configured (`TETHER_AUDIT_KEY`, or `--audit-key`):

- the runtime checkpoints a run whenever it stops (pauses, finishes, escalates, hands off)
  and `tether approve|deny|answer` checkpoints the decision it records;
- `tether audit checkpoint` (cron) signs a Merkle root over every run's head, so runs that
  never stopped since are anchored too;
- `--witness FILE` (or `TETHER_AUDIT_WITNESS`) also appends every checkpoint to a JSON-lines
  file, meant to live where the database's writers cannot rewrite it (another host, WORM
  storage): checkpoints deleted from the database are found missing against it.

`verify_journal` checks chains, rows against chains, tickets, the triggers, every checkpoint's
signature and every signed hash against the chain; `export_run` writes one run as a
self-contained JSON-lines bundle that `verify_bundle` checks without the database.

Checkpoint bodies are canonical JSON (sorted keys, `tether.hashing.encode_json`); the
signature is over the body's UTF-8 bytes, hex-encoded; a key is named by its fingerprint,
`ed25519:` and the first 32 hex digits of the SHA-256 of the raw public key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from tether.errors import JournalError, JournalTampered, RunNotFound
from tether.hashing import encode_json, sha256_hex
from tether.journal import integrity
from tether.journal.integrity import Finding
from tether.journal.records import GENESIS_HASH, Entry, RunRecord, Ticket

KEY_ENV = "TETHER_AUDIT_KEY"
WITNESS_ENV = "TETHER_AUDIT_WITNESS"
FORMAT = 1
# Kinds that end a run for good: nothing may follow them in its chain.
FINAL_KINDS = frozenset({"run_finished"})


class AuditKeyError(JournalError):
    """An audit key file is missing, unreadable or not an Ed25519 key."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - cryptography ships with the audit extra
        raise AuditKeyError(
            f"signed checkpoints need `cryptography` ({exc}): pip install 'tether[audit]'"
        ) from None
    return serialization, ed25519


class AuditKey:
    """An Ed25519 key: private (signs and verifies) or public only (verifies)."""

    def __init__(self, public: Any, private: Any = None) -> None:
        serialization, _ = _crypto()
        self.public, self.private = public, private
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.fingerprint = "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]

    @classmethod
    def generate(cls) -> AuditKey:
        _, ed25519 = _crypto()
        private = ed25519.Ed25519PrivateKey.generate()
        return cls(private.public_key(), private)

    @classmethod
    def load(cls, path: str | Path) -> AuditKey:
        """A key file as `keygen` writes them: the private key (PEM, PKCS#8) or the public one."""
        serialization, ed25519 = _crypto()
        file = Path(path)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise AuditKeyError(f"cannot read audit key {file}: {exc.strerror or exc}") from None
        try:
            if b"PRIVATE KEY" in data:
                private = serialization.load_pem_private_key(data, password=None)
                if not isinstance(private, ed25519.Ed25519PrivateKey):
                    raise ValueError("not an Ed25519 key")
                return cls(private.public_key(), private)
            public = serialization.load_pem_public_key(data)
            if not isinstance(public, ed25519.Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            return cls(public)
        except ValueError as exc:
            raise AuditKeyError(f"audit key {file} is not an Ed25519 PEM key: {exc}") from None

    @classmethod
    def from_pem(cls, text: str) -> AuditKey:
        serialization, ed25519 = _crypto()
        public = serialization.load_pem_public_key(text.encode())
        if not isinstance(public, ed25519.Ed25519PublicKey):
            raise AuditKeyError("the public key given is not an Ed25519 key")
        return cls(public)

    def public_pem(self) -> str:
        serialization, _ = _crypto()
        pem: bytes = self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode()

    def private_pem(self) -> str:
        serialization, _ = _crypto()
        if self.private is None:
            raise AuditKeyError("this key is public only")
        pem: bytes = self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return pem.decode()

    def sign(self, body: str) -> str:
        if self.private is None:
            raise AuditKeyError(f"key {self.fingerprint} is public only: it cannot sign checkpoints")
        signature: bytes = self.private.sign(body.encode())
        return signature.hex()

    def verifies(self, body: str, signature: str) -> bool:
        try:
            self.public.verify(bytes.fromhex(signature), body.encode())
        except Exception:  # InvalidSignature, or a signature that is not hex
            return False
        return True


def write_key(key: AuditKey, out: Path) -> Path:
    """Write the private key to `out` (owner-only) and the public key beside it (`out.pub`)."""
    if out.exists():
        raise AuditKeyError(f"{out} exists; an audit key is never overwritten (choose another --out)")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.private_pem())
    public = out.with_name(out.name + ".pub")
    public.write_text(key.public_pem())
    return public


# -- checkpoints -------------------------------------------------------------------------


class Checkpoint(msgspec.Struct, frozen=True):
    """A stored checkpoint: its signed body (canonical JSON), the key and the signature."""

    kind: str  # "run" or "journal"
    body: str
    key_id: str
    signature: str
    id: int | None = None
    run_id: str | None = None
    seq: int | None = None
    hash: str | None = None

    @classmethod
    def of_row(cls, row: Sequence[Any]) -> Checkpoint:
        id_, kind, run_id, seq, hash_, body, key_id, signature, _ = row
        return cls(kind, body, key_id, signature, id_, run_id, None if seq is None else int(seq), hash_)

    def values(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded

    def line(self) -> dict[str, Any]:
        return {"kind": self.kind, "body": self.body, "key_id": self.key_id, "signature": self.signature}


def merkle_root(leaves: Sequence[tuple[str, int, str]]) -> str:
    """The Merkle root over run heads (run_id, seq, hash), in the given order: leaves hashed
    with a 0x00 prefix, nodes with 0x01 (RFC 6962's separation), an odd node carried up."""
    level = [hashlib.sha256(b"\x00" + encode_json(list(leaf)).encode()).digest() for leaf in leaves]
    if not level:
        return sha256_hex(b"")
    while len(level) > 1:
        nxt = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


class Auditor:
    """Signs checkpoints with a private key and stores them (and appends them to a witness)."""

    def __init__(self, key: AuditKey, witness: Path | None = None) -> None:
        if key.private is None:
            raise AuditKeyError(f"key {key.fingerprint} is public only: checkpoints need the private key")
        self.key, self.witness = key, witness

    @classmethod
    def from_env(cls) -> Auditor | None:
        """The auditor `TETHER_AUDIT_KEY` (and `TETHER_AUDIT_WITNESS`) configure, if any."""
        path = os.environ.get(KEY_ENV)
        if not path:
            return None
        witness = os.environ.get(WITNESS_ENV)
        return cls(AuditKey.load(path), Path(witness) if witness else None)

    async def _store(self, journal: Any, checkpoint: Checkpoint) -> Checkpoint:
        await journal.add_checkpoint(
            checkpoint.kind,
            checkpoint.run_id,
            checkpoint.seq,
            checkpoint.hash,
            checkpoint.body,
            checkpoint.key_id,
            checkpoint.signature,
        )
        if self.witness is not None:
            append_witness(self.witness, checkpoint)
        return checkpoint

    def _signed(self, kind: str, values: dict[str, Any], **where: Any) -> Checkpoint:
        body = encode_json({"format": FORMAT, "kind": kind, "key": self.key.fingerprint, **values})
        return Checkpoint(kind, body, self.key.fingerprint, self.key.sign(body), **where)

    async def checkpoint_run(self, journal: Any, run_id: str) -> Checkpoint | None:
        """Sign the run's head and the hashes of its entries since its last checkpoint (None
        when nothing was added). A chain that does not hold is never signed."""
        previous = [Checkpoint.of_row(r) for r in await journal.read_checkpoints(run_id, kind="run")]
        from_seq, from_hash = 0, GENESIS_HASH
        if previous:
            last = previous[-1]
            from_seq, from_hash = int(last.seq or 0), str(last.hash)
        entries = await journal.read_entries(run_id, from_seq)
        if not entries:
            return None
        found = _continuation_findings(run_id, entries, from_seq, from_hash)
        if found:
            raise JournalTampered(found, doing=f"sign a checkpoint of run {run_id}")
        head = entries[-1]
        values = {
            "run_id": run_id,
            "seq": head.seq,
            "hash": head.hash,
            "from_seq": from_seq,
            "hashes": [e.hash for e in entries],
        }
        checkpoint = self._signed("run", values, run_id=run_id, seq=head.seq, hash=head.hash)
        return await self._store(journal, checkpoint)

    async def check_anchor(self, journal: Any, run_id: str, *, doing: str) -> None:
        """Refuse (`JournalTampered`) to act on a run whose chain no longer holds the head its
        last checkpoint signed (truncated, or rewritten consistently), has entries after a
        signed end, or holds a ticket decision nobody signed: with a key configured, every
        process that records a decision signs it (`tether approve` does), so an unsigned one
        was written by someone without the key — a forged approval with a correct hash.
        One read: the latest checkpoint, and the entries from its head on."""
        rows = await journal.read_checkpoints(run_id, kind="run")
        if not rows:
            return
        cp = Checkpoint.of_row(rows[-1])
        problem = _signature_problem(cp, self.key)
        seq = int(cp.seq or 0)
        found: list[Finding] = []
        if problem is not None:
            found.append(Finding("edited", f"checkpoint #{cp.id}: {problem}", run_id))
        else:
            entries = await journal.read_entries(run_id, seq - 1)
            if not entries or entries[0].seq != seq:
                found.append(
                    Finding("truncated", f"seq {seq}, signed in checkpoint #{cp.id}, is gone", run_id, seq)
                )
            elif entries[0].hash != cp.hash:
                found.append(
                    Finding(
                        "edited",
                        f"the chain at seq {seq} is not the one checkpoint #{cp.id} signed",
                        run_id,
                        seq,
                    )
                )
            elif entries[0].kind in FINAL_KINDS and len(entries) > 1:
                found.append(
                    Finding("inserted", f"entries follow the run's signed end (seq {seq})", run_id, seq + 1)
                )
            else:
                found += [
                    Finding(
                        "inserted",
                        "a ticket decision nobody signed (written without the audit key)",
                        run_id,
                        e.seq,
                    )
                    for e in entries[1:]
                    if e.kind == "ticket_decided"
                ]
        if found:
            raise JournalTampered(found, doing=doing)

    async def checkpoint_journal(self, journal: Any) -> Checkpoint:
        """Sign a Merkle root over every run's head as its chain has it now."""
        heads = await journal.run_heads()
        values = {"root": merkle_root(heads), "runs": [list(h) for h in heads]}
        checkpoint = self._signed("journal", values)
        return await self._store(journal, checkpoint)


def _continuation_findings(
    run_id: str, entries: Sequence[Entry], from_seq: int, from_hash: str
) -> list[Finding]:
    """Entries after a checkpointed head: contiguous, linked to it, each rehashing."""
    if entries[0].seq != from_seq + 1 or entries[0].prev_hash != from_hash:
        return [
            Finding("edited", f"the chain does not continue from its signed head (seq {from_seq})", run_id)
        ]
    found = []
    prev, expected = from_hash, from_seq + 1
    for e in entries:
        if e.seq != expected or e.prev_hash != prev or not integrity.rehashes(e, e.seq):
            found.append(Finding("edited", "entry does not chain after the signed head", run_id, e.seq))
            break
        prev, expected = e.hash, e.seq + 1
    return found


def append_witness(path: Path, checkpoint: Checkpoint) -> None:
    """Append one checkpoint to the witness file (one JSON line, synced before returning)."""
    line = (json.dumps(checkpoint.line(), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_witness(path: Path) -> list[Checkpoint]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise AuditKeyError(f"cannot read witness {path}: {exc.strerror or exc}") from None
    out = []
    for n, line in enumerate(lines, 1):
        try:
            values = json.loads(line)
            out.append(Checkpoint(values["kind"], values["body"], values["key_id"], values["signature"]))
        except (ValueError, KeyError, TypeError):
            raise AuditKeyError(f"witness {path} line {n} is not a checkpoint") from None
    return out


# -- verification --------------------------------------------------------------------------


@dataclass
class Report:
    """What `verify` found: problems (non-zero exit), warnings, and what was looked at."""

    findings: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    runs: int = 0
    entries: int = 0
    checkpoints: int = 0
    key: str | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "runs": self.runs,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "key": self.key,
            "findings": [msgspec.to_builtins(f) for f in self.findings],
            "warnings": [msgspec.to_builtins(f) for f in self.warnings],
        }


def checkpoint_findings(
    run_id: str, entries: Sequence[Entry], checkpoints: Sequence[Checkpoint], key: AuditKey | None
) -> tuple[list[Finding], list[Finding]]:
    """A run's chain against its signed checkpoints: (problems, warnings). Every signed
    hash must be the hash of the entry at its seq; the first that is not names where the
    chain was rewritten, cut or truncated."""
    problems: list[Finding] = []
    warnings: list[Finding] = []
    by_seq = {e.seq: e for e in entries}
    last = entries[-1].seq if entries else 0
    signed_to = 0
    for cp in checkpoints:
        bad = _signature_problem(cp, key)
        if bad is not None:
            problems.append(Finding("edited", f"checkpoint #{cp.id}: {bad}", run_id))
            continue
        values = cp.values()
        if values.get("run_id") != run_id or values.get("seq") != cp.seq or values.get("hash") != cp.hash:
            problems.append(
                Finding("edited", f"checkpoint #{cp.id}: its columns differ from its signed body", run_id)
            )
            continue
        for offset, signed in enumerate(values.get("hashes", [])):
            seq = int(values["from_seq"]) + 1 + offset
            entry = by_seq.get(seq)
            if entry is None:
                kind = "truncated" if seq > last else "deleted"
                what = f"the chain ends at seq {last}" if seq > last else f"seq {seq} is missing"
                problems.append(
                    Finding(
                        kind,
                        f"{what}; checkpoint #{cp.id} signed the run up to seq {values['seq']}",
                        run_id,
                        seq,
                    )
                )
                break
            if entry.hash != signed:
                problems.append(
                    Finding(
                        "edited",
                        f"differs from checkpoint #{cp.id}, signed with the run at seq {values['seq']}: the "
                        "chain was rewritten from here (its hashes were recomputed)",
                        run_id,
                        seq,
                    )
                )
                break
        signed_to = max(signed_to, int(values["seq"]))
    if signed_to and key is not None:
        # Every process that records a decision signs it when a key is in use: one that
        # nobody signed was written without the key.
        problems += [
            Finding(
                "inserted", "a ticket decision nobody signed (written without the audit key)", run_id, e.seq
            )
            for e in entries
            if e.seq > signed_to and e.kind == "ticket_decided"
        ]
    if signed_to and last > signed_to:
        final = by_seq.get(signed_to)
        if final is not None and final.kind in FINAL_KINDS:
            problems.append(
                Finding(
                    "inserted",
                    f"seqs {signed_to + 1}-{last} follow the run's signed end "
                    f"(seq {signed_to}, {final.kind})",
                    run_id,
                    signed_to + 1,
                )
            )
        else:
            warnings.append(
                Finding("unsigned", f"seqs {signed_to + 1}-{last} are not signed yet", run_id, signed_to + 1)
            )
    return problems, warnings


def _signature_problem(cp: Checkpoint, key: AuditKey | None) -> str | None:
    if key is None:
        return None
    if cp.key_id != key.fingerprint:
        return f"signed by key {cp.key_id}, not {key.fingerprint}"
    if not key.verifies(cp.body, cp.signature):
        return "its signature does not verify (the body or the signature was changed)"
    return None


def journal_root_findings(
    checkpoint: Checkpoint, heads: dict[str, dict[int, str]], key: AuditKey | None
) -> list[Finding]:
    """A signed Merkle root: its signature, its root over its leaves, and each run head it
    names still in that run's chain (`heads`: run -> seq -> hash of the entries read)."""
    bad = _signature_problem(checkpoint, key)
    if bad is not None:
        return [Finding("edited", f"journal checkpoint #{checkpoint.id}: {bad}")]
    values = checkpoint.values()
    leaves = [(str(r), int(s), str(h)) for r, s, h in values.get("runs", [])]
    if merkle_root(leaves) != values.get("root"):
        return [
            Finding("edited", f"journal checkpoint #{checkpoint.id}: its root is not the root of its runs")
        ]
    out = []
    for run_id, seq, hash_ in leaves:
        chain = heads.get(run_id)
        if chain is None:
            out.append(
                Finding("deleted", f"the run is gone; journal checkpoint #{checkpoint.id} signed it", run_id)
            )
        elif seq not in chain:
            last = max(chain, default=0)
            kind = "truncated" if seq > last else "deleted"
            out.append(
                Finding(
                    kind, f"seq {seq} is gone; journal checkpoint #{checkpoint.id} signed it", run_id, seq
                )
            )
        elif chain[seq] != hash_:
            out.append(
                Finding(
                    "edited",
                    f"differs from journal checkpoint #{checkpoint.id}: the chain was rewritten",
                    run_id,
                    seq,
                )
            )
    return out


def witness_findings(
    witness: Sequence[Checkpoint], stored: Sequence[Checkpoint], key: AuditKey | None
) -> list[Finding]:
    """Every checkpoint the witness holds is in the database, unchanged."""
    have = {(c.body, c.signature) for c in stored}
    out = []
    for n, cp in enumerate(witness, 1):
        bad = _signature_problem(cp, key)
        if bad is not None:
            out.append(Finding("edited", f"witness line {n}: {bad}"))
        elif (cp.body, cp.signature) not in have:
            values = cp.values()
            out.append(
                Finding(
                    "deleted",
                    f"witness line {n} ({cp.kind} checkpoint, seq {values.get('seq')}) "
                    "is not in the database",
                    values.get("run_id"),
                )
            )
    return out


async def verify_journal(
    journal: Any,
    run_ids: Sequence[str] | None = None,
    *,
    key: AuditKey | None = None,
    witness: Path | None = None,
) -> Report:
    """Verify runs (all without `run_ids`): triggers, chains, rows and tickets against the
    chains, signed checkpoints (with `key`), journal roots and the witness."""
    report = Report(key=key.fingerprint if key is not None else None)
    report.findings += await journal.check_triggers()
    all_runs = run_ids is None
    ids = list(run_ids) if run_ids is not None else await journal.run_ids()
    stored = [Checkpoint.of_row(r) for r in await journal.read_checkpoints()]
    report.checkpoints = len(stored)
    heads: dict[str, dict[int, str]] = {}
    for run_id in ids:
        entries = await journal.read_entries(run_id)
        try:
            run: RunRecord | None = await journal.get_run(run_id)
        except RunNotFound:
            run = None
        if run is None and not entries:
            raise RunNotFound(f"no run {run_id!r} in the journal")
        report.runs += 1
        report.entries += len(entries)
        heads[run_id] = {e.seq: e.hash for e in entries}
        if run is None:
            report.findings.append(Finding("deleted", "the run's row is gone; its chain remains", run_id))
            report.findings += integrity.chain_findings(run_id, entries)
        else:
            tickets = await journal.run_tickets(run_id)
            report.findings += integrity.run_findings(run, entries, tickets)
        cps = [c for c in stored if c.kind == "run" and c.run_id == run_id]
        problems, warnings = checkpoint_findings(run_id, entries, cps, key)
        report.findings += problems
        report.warnings += warnings
        if key is not None and not cps:
            report.warnings.append(Finding("unsigned", "no signed checkpoint of this run", run_id))
    for cp in stored:
        if cp.kind == "journal":
            report.findings += [
                f
                for f in journal_root_findings(cp, heads, key)
                if all_runs or f.run_id in heads or f.run_id is None
            ]
    if witness is not None and witness.exists():
        report.findings += witness_findings(read_witness(witness), stored, key)
    elif witness is not None and stored:
        report.findings.append(
            Finding("deleted", f"the witness {witness} is gone; the journal holds checkpoints")
        )
    if key is None and stored:
        report.warnings.append(
            Finding("unsigned", "checkpoint signatures not checked: give the public key (--key)")
        )
    report.findings.sort(key=lambda f: (f.run_id or "", f.seq if f.seq is not None else 1 << 62))
    return report


# -- export --------------------------------------------------------------------------------


async def export_run(
    journal: Any, run_id: str, *, sources: Iterable[tuple[str, str, str]] = ()
) -> list[dict[str, Any]]:
    """One run as the lines of a self-contained bundle: its row, entries (the exact text
    each hash covers), tickets, signed checkpoints and the public key's fingerprint, and
    `sources` (role, pinned hash, text): the workflow and policy texts, by hash."""
    run = await journal.get_run(run_id)
    entries = await journal.read_entries(run_id)
    tickets = await journal.run_tickets(run_id)
    cps = [Checkpoint.of_row(r) for r in await journal.read_checkpoints(run_id, kind="run")]
    lines: list[dict[str, Any]] = [{"type": "bundle", "format": FORMAT, "run_id": run_id}]
    lines.append({"type": "run", "row": run.model_dump()})
    for e in entries:
        lines.append({"type": "entry", **{f: getattr(e, f) for f in e.__struct_fields__}})
    for t in tickets:
        lines.append({"type": "ticket", "row": t.model_dump()})
    keys = sorted({c.key_id for c in cps})
    for cp in cps:
        lines.append({"type": "checkpoint", **cp.line(), "id": cp.id})
    for key_id in keys:
        lines.append({"type": "key", "fingerprint": key_id})
    for role, pinned, text in sources:
        lines.append(
            {"type": "source", "role": role, "pinned_hash": pinned, "sha256": sha256_hex(text), "text": text}
        )
    return lines


def verify_bundle(lines: Sequence[dict[str, Any]], key: AuditKey | None) -> Report:
    """Check an exported bundle without the database: its chain, its rows against it, its
    checkpoints (signatures with `key`), and its source texts against their hashes."""
    head = lines[0] if lines else {}
    if head.get("type") != "bundle" or head.get("format") != FORMAT:
        raise JournalError("not a tether audit bundle (its first line must be the bundle header)")
    run_id = str(head["run_id"])
    report = Report(key=key.fingerprint if key is not None else None, runs=1)
    entries: list[Entry] = []
    tickets: list[Ticket] = []
    cps: list[Checkpoint] = []
    run: RunRecord | None = None
    for n, line in enumerate(lines[1:], 2):
        kind = line.get("type")
        try:
            if kind == "run":
                run = RunRecord.model_validate(line["row"])
            elif kind == "entry":
                values = {k: v for k, v in line.items() if k != "type"}
                entries.append(msgspec.convert(values, Entry))
            elif kind == "ticket":
                tickets.append(Ticket.model_validate(line["row"]))
            elif kind == "checkpoint":
                cps.append(
                    Checkpoint(
                        line["kind"], line["body"], line["key_id"], line["signature"], line.get("id"), run_id
                    )
                )
            elif kind == "source" and sha256_hex(line["text"]) != line["sha256"]:
                report.findings.append(
                    Finding("edited", f"line {n}: the {line['role']} text does not match its hash", run_id)
                )
        except (KeyError, TypeError, ValueError, msgspec.ValidationError) as exc:
            raise JournalError(f"bundle line {n} ({kind}) is malformed: {exc}") from None
    if run is None:
        raise JournalError("the bundle holds no run row")
    entries.sort(key=lambda e: e.seq)
    report.entries, report.checkpoints = len(entries), len(cps)
    cps = [
        msgspec.structs.replace(c, seq=c.values().get("seq"), hash=c.values().get("hash"))
        for c in cps
        if c.kind == "run"
    ]
    report.findings += integrity.run_findings(run, entries, tickets)
    problems, warnings = checkpoint_findings(run_id, entries, cps, key)
    report.findings += problems
    report.warnings += warnings
    if key is None:
        report.warnings.append(
            Finding("unsigned", "checkpoint signatures not checked: give the public key (--key)")
        )
    elif not cps:
        report.warnings.append(Finding("unsigned", "the bundle holds no signed checkpoint", run_id))
    report.findings.sort(key=lambda f: f.seq if f.seq is not None else 1 << 62)
    return report
