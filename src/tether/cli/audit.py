"""`tether audit`: keys, signed checkpoints, verification and export of the journal.

Exit codes: `verify` exits 1 when it finds damage (for CI and cron), 0 when the journal (or
the bundle) is sound; 2 for bad input, as every command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.markup import escape

from tether import audit
from tether.audit import AuditKey, Auditor, Report
from tether.cli.common import DbOption, JsonOption, fail, open_store, out, print_json, run_command
from tether.errors import JournalError
from tether.journal import RunRecord
from tether.journal.integrity import Finding
from tether.loader import POLICY_FILE

app = typer.Typer(no_args_is_help=True)

KeyOption = Annotated[
    Path | None,
    typer.Option(
        "--key",
        help=f"The public key (or the private key file) to check signatures with. Default: ${audit.KEY_ENV}.",
    ),
]
AuditKeyOption = Annotated[
    Path | None,
    typer.Option("--audit-key", envvar=audit.KEY_ENV, help="The private key file that signs checkpoints."),
]
WitnessOption = Annotated[
    Path | None,
    typer.Option(
        "--witness",
        envvar=audit.WITNESS_ENV,
        help="An append-only JSON-lines file every checkpoint is also written to (and checked against).",
    ),
]


@app.command()
def keygen(
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the private key.")] = Path(
        "tether-audit.key"
    ),
    as_json: JsonOption = False,
) -> None:
    """Make an Ed25519 key pair: the private key (owner-only) and KEY.pub beside it."""
    try:
        key = AuditKey.generate()
        public = audit.write_key(key, out_path)
    except JournalError as exc:
        fail(str(exc))
    if as_json:
        print_json({"private_key": str(out_path), "public_key": str(public), "fingerprint": key.fingerprint})
        return
    out.print(f"private key {out_path} (keep it outside the database; owner-only)")
    out.print(f"public key  {public}  fingerprint {key.fingerprint}")
    out.print(
        f"sign checkpoints: export {audit.KEY_ENV}={out_path}   verify: tether audit verify --key {public}"
    )


def _public_key(key: Path | None) -> AuditKey | None:
    if key is None:
        configured = audit.Auditor.from_env()
        return configured.key if configured is not None else None
    try:
        return AuditKey.load(key)
    except JournalError as exc:
        fail(str(exc))


@app.command()
def verify(
    run_id: Annotated[str | None, typer.Argument(metavar="[RUN]", help="The run to verify.")] = None,
    all_runs: Annotated[bool, typer.Option("--all", help="Verify every run of the journal.")] = False,
    key: KeyOption = None,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="Verify an exported bundle, without the database.")
    ] = None,
    witness: WitnessOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check chains, heads against signed checkpoints, rows against chains and the triggers;
    name the first bad entry of each run and the kind of damage. Exit 1 on any damage."""
    public = _public_key(key)
    if bundle is not None:
        if run_id or all_runs:
            fail("--bundle verifies the bundle alone: give no RUN and no --all")
        try:
            lines = [json.loads(line) for line in bundle.read_text().splitlines() if line.strip()]
            report = audit.verify_bundle(lines, public)
        except OSError as exc:
            fail(f"cannot read bundle {bundle}: {exc.strerror or exc}")
        except ValueError as exc:
            fail(f"bundle {bundle} is not JSON lines: {exc}")
        except JournalError as exc:
            fail(str(exc))
        _print_report(report, f"bundle {bundle}", as_json)
        return
    if bool(run_id) == all_runs:
        fail("give one RUN, or --all")

    async def main() -> Report:
        async with open_store(db) as journal:
            return await audit.verify_journal(
                journal, None if all_runs else [str(run_id)], key=public, witness=witness
            )

    _print_report(run_command(main), f"run {run_id}" if run_id else "journal", as_json)


def _print_report(report: Report, what: str, as_json: bool) -> None:
    if as_json:
        print_json(report.as_dict())
    else:
        keyed = f"key {report.key}" if report.key else "no key: signatures not checked"
        out.print(
            f"{what}: {report.runs} run(s), {report.entries} entries, "
            f"{report.checkpoints} checkpoint(s); {keyed}"
        )
        for f in report.findings:
            out.print(f"  [red]{escape(f.kind)}[/] {escape(_where(f))}{escape(f.message)}")
        for f in report.warnings:
            out.print(f"  [yellow]warning[/] {escape(_where(f))}{escape(f.message)}")
        out.print(
            "[green]verified: no damage found[/]"
            if report.ok
            else f"[red]{len(report.findings)} problem(s)[/]"
        )
    if not report.ok:
        raise typer.Exit(1)


def _where(f: Finding) -> str:
    if f.run_id is None:
        return ""
    return f"{f.run_id} seq {f.seq}: " if f.seq is not None else f"{f.run_id}: "


@app.command()
def export(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    out_file: Annotated[Path | None, typer.Option("--out", help="Write here instead of stdout.")] = None,
    db: DbOption = None,
) -> None:
    """A self-contained JSON-lines bundle of one run: entries, tickets, signed checkpoints,
    the key's fingerprint, and the workflow and policy texts by hash."""

    async def main() -> list[dict[str, Any]]:
        async with open_store(db) as journal:
            run = await journal.get_run(run_id)
            return await audit.export_run(journal, run_id, sources=_sources(run))

    lines = run_command(main)
    text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
    if out_file is None:
        sys.stdout.write(text)
    else:
        out_file.write_text(text)


def _sources(run: RunRecord) -> list[tuple[str, str, str]]:
    """The workflow file and the policy file the run was started from, as they are now: the
    bundle carries each text by its SHA-256, beside the hash the run is pinned to."""
    found: list[tuple[str, str, str]] = []
    ref = Path(run.workflow_ref) if not run.workflow_ref.startswith("<") else None
    if ref is not None and ref.is_dir():
        ref = ref / "workflow.yaml"
    if ref is None or not ref.is_file():
        return found
    text = ref.read_text()
    found.append(("workflow", run.workflow_hash, text))
    policy = Path(run.policy_ref) if run.policy_ref else None
    if policy is None:
        try:
            declared = yaml.safe_load(text).get("policy")
        except (yaml.YAMLError, AttributeError):
            declared = None
        policy = ref.parent / (declared if isinstance(declared, str) else POLICY_FILE)
    if policy.is_file():
        found.append(("policy", run.policy_hash, policy.read_text()))
    return found


@app.command()
def checkpoint(
    run_id: Annotated[str | None, typer.Argument(metavar="[RUN]", help="Sign this run's head only.")] = None,
    audit_key: AuditKeyOption = None,
    witness: WitnessOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Sign a checkpoint now: one run's head, or (by default) a Merkle root over every run's
    head — run it from cron so runs that have not stopped are anchored too."""
    if audit_key is None:
        fail(f"no key to sign with: give --audit-key KEY or set ${audit.KEY_ENV} (tether audit keygen)")
    try:
        auditor = Auditor(AuditKey.load(audit_key), witness)
    except JournalError as exc:
        fail(str(exc))

    async def main() -> audit.Checkpoint | None:
        async with open_store(db) as journal:
            if run_id is not None:
                return await auditor.checkpoint_run(journal, run_id)
            return await auditor.checkpoint_journal(journal)

    made = run_command(main)
    values = made.values() if made is not None else None
    if as_json:
        print_json({"checkpoint": values, "key": auditor.key.fingerprint})
    elif values is None:
        out.print(f"run {run_id}: nothing new to sign")
    elif made is not None and made.kind == "journal":
        out.print(f"signed the journal's root {values['root'][:16]}… over {len(values['runs'])} run(s)")
    else:
        out.print(f"signed run {run_id} at seq {values['seq']} ({values['hash'][:16]}…)")


@app.command("restore-triggers")
def restore_triggers(db: DbOption = None) -> None:
    """Make the append-only triggers again — after `tether audit verify --all` found the
    chains sound against their signed checkpoints."""

    async def main() -> list[Finding]:
        async with open_store(db) as journal:
            return await journal.restore_triggers()

    before = run_command(main)
    if not before:
        out.print("the append-only triggers were in place; made again")
    for f in before:
        out.print(f"restored: {escape(f.message)}")
