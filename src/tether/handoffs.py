"""Structured handoffs: a contract kept apart from the transcript, checked for staleness by
whoever receives it.

A handoff (a model's `handoff` proposal, or a policy `defer`) records a `HandedOver`: the
state of the work (the run's data and facts), the owner of the next step, what changed (the
effects the run carried out), what is open (the model's risks and questions, a deferred
proposal) and every value the sender relied on, each with what can read it again — the
resolver call a policy decision made, or the verifier that established a fact.

The receiver reads each relied-on value again before acting (`read_again`). When one has
changed, or can no longer be read, the handoff is turned back (`handoff_returned`, with the
differences) to the sending state, whose model is told what changed; otherwise it is
received (`handoff_received`):
- an agent state the sender's `handoff_to` names (a workflow routes the handoff to it)
  receives it at once, in the same commit: its visit opens with the handoff record, and its
  model sees that record, never the sender's transcript;
- a person (any other owner) receives it later, through `Runtime.pick_up` (`tether pickup
  RUN`): the run stays handed off, now theirs, or — when stale — goes back to the sender;
- unless the state hands over only the call (`on_defer: continue`, an MCP gateway's
  session): the handoff is recorded for its owner, the call is not run, the run goes on.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tether.decision import Decision
from tether.hashing import encode_json
from tether.journal import Entry, Journal, RunRecord
from tether.journal import bodies as b
from tether.proposals import Handoff, Proposal, as_dict
from tether.reasons import ReasonCode
from tether.tools import ToolContext
from tether.workflow import Workflow

if TYPE_CHECKING:  # the governed step calls into this module, and is handed in
    from tether.step import GovernedStep


async def hand_off(step: GovernedStep, proposal: Proposal, decision: Decision, args_hash: str) -> None:
    """Record a handoff to `decision.owner` (else the state's `escalate_to`). An owner the
    state's `handoff_to` routes to an agent state receives it there and then, after reading
    every relied-on value again; any other owner gets the run, handed off."""
    cursor, state = step.cursor, step.state
    owner = decision.owner or state.escalate_to
    routed = owner in cursor.workflow.handoff_states(state)
    entries = await cursor.journal.read_entries(cursor.run_id)
    handed = b.HandedOver(
        owner=owner,
        state=state.name,
        data=cursor.record.data,
        facts=cursor.record.facts,
        pending_proposal=None if isinstance(proposal, Handoff) else as_dict(proposal),
        note=decision.reason,
        at_seq=cursor.record.last_seq,
        to_state=owner if routed else None,
        changed=changes(entries, cursor.workflow),
        risks=list(proposal.risks) if isinstance(proposal, Handoff) else [],
        questions=list(proposal.questions) if isinstance(proposal, Handoff) else [],
        relied_on=relied_on(entries, cursor.record.facts, decision),
    )
    record = b.HandedOff(proposal=proposal, decision=decision.stored(), handoff=handed, args_hash=args_hash)
    if not routed and state.on_defer == "continue" and not isinstance(proposal, Handoff):
        # Only the call is handed over: on the record, with its owner; the run goes on.
        await step.record(record)
        return
    if not routed:
        await step.record(
            record,
            status="handed_off",
            owner=owner,
            reason_code=ReasonCode.DEFERRED,
            message=f"handed off to {owner}: {decision.reason}",
        )
        return
    checked, unchecked = await read_again(
        handed, cursor.workflow, cursor.record, cursor.journal, step.step_id
    )
    by = f"state:{owner}"
    stale = [c for c in checked if c.changed]
    if stale:
        returned = b.HandoffReturned(by=by, differences=stale, checked=checked)
        await step.record(record, returned, facts=b.refreshed(cursor.record.facts, stale))
        return
    received = b.HandoffReceived(by=by, checked=checked, unchecked=unchecked, to_state=owner, handoff=handed)
    cursor.enter(owner, entries_in_commit=1)  # the receiver's visit opens with `received`
    await step.record(record, received, status="running", observe=False)
    cursor.observe(received, step.step_id)


async def pick_up(step: GovernedStep, handed: b.HandedOver, by: str) -> list[b.FactCheck]:
    """A person picks a handed-off run up: every relied-on value is read again. Unchanged,
    the handoff is theirs (the run stays handed off, owned by `by`); changed, it goes back
    to the sending state. Returns the differences (none when received)."""
    cursor = step.cursor
    checked, unchecked = await read_again(
        handed, cursor.workflow, cursor.record, cursor.journal, step.step_id
    )
    stale = [c for c in checked if c.changed]
    if stale:
        cursor.clear_notice()
        returned = b.HandoffReturned(by=by, differences=stale, checked=checked)
        await step.record(returned, status="running", facts=b.refreshed(cursor.record.facts, stale))
        return stale
    said = f"{len(checked)} value(s) read again, unchanged" + (
        f"; not re-readable: {', '.join(unchecked)}" if unchecked else ""
    )
    await step.record(
        b.HandoffReceived(by=by, checked=checked, unchecked=unchecked),
        status="handed_off",
        owner=by,
        reason_code=ReasonCode.DEFERRED,
        message=f"picked up by {by}: {said}",
    )
    return []


# -- what a handoff carries -----------------------------------------------------------------------


def changes(entries: Sequence[Entry], workflow: Workflow) -> list[b.ChangedEffect]:
    """The effects the run carried out: every executed call of a tool that is not a read."""
    tools = workflow.tools()
    found = []
    for e in entries:
        record = e.body
        if not isinstance(record, b.Executed) or e.step_id is None:
            continue
        tool = tools.get(record.tool)
        effect = tool.effect if tool is not None else "external"
        if effect == "read":
            continue
        verified = record.verification.get("ok") if record.verification else None
        found.append(
            b.ChangedEffect(
                step_id=e.step_id,
                state=e.state or "",
                tool=record.tool,
                effect=effect,
                args=record.args,
                verified=verified if isinstance(verified, bool) else None,
            )
        )
    return found


def relied_on(entries: Sequence[Entry], facts: dict[str, Any], decision: Decision) -> list[b.ReliedFact]:
    """Every value the run's decisions and facts rest on: each resolver call a decision
    recorded (the latest value per call, the deferring decision's own included) and each
    fact, with the step that established it."""
    calls: dict[str, b.ReliedFact] = {}
    origins: dict[str, b.ReliedFact] = {}
    for e in entries:
        record = e.body
        if isinstance(record, b.Executed) and not isinstance(record, b.VerificationFailed):
            established = (record.verification or {}).get("facts") or {}
            for name in established:
                origins[name] = b.ReliedFact(f"facts.{name}", "verifier", step_id=e.step_id, tool=record.tool)
        elif isinstance(record, b.StepDone):
            for name in record.facts:
                origins[name] = b.ReliedFact(f"facts.{name}", "step", step_id=e.step_id)
        elif isinstance(record, b.Answered) and record.fact is not None:
            origins[record.fact] = b.ReliedFact(f"facts.{record.fact}", "answer", step_id=e.step_id)
        recorded = getattr(record, "decision", None)
        if isinstance(recorded, Decision):
            calls.update(_calls(recorded, e.step_id))
    calls.update(_calls(decision, None))
    held = [
        _with_value(origins.get(name) or b.ReliedFact(f"facts.{name}", "step"), value)
        for name, value in facts.items()
    ]
    return held + list(calls.values())


def _with_value(fact: b.ReliedFact, value: Any) -> b.ReliedFact:
    return b.ReliedFact(fact.name, fact.reader, value, fact.step_id, fact.resolver, fact.args, fact.tool)


def _calls(decision: Decision, step_id: str | None) -> dict[str, b.ReliedFact]:
    found = {}
    for call, value in decision.resolved.items():
        parsed = parse_call(call)
        if parsed is not None:
            found[call] = b.ReliedFact(call, "resolver", value, step_id, parsed[0], parsed[1])
    return found


def parse_call(call: str) -> tuple[str, list[Any]] | None:
    """`order_status("A-1", 2)` -> (`order_status`, ["A-1", 2]): a resolver call as a
    decision records it (`tether.policy` writes each argument as JSON)."""
    name, paren, rest = call.partition("(")
    if not paren or not rest.endswith(")") or not name.isidentifier():
        return None
    try:
        args = json.loads(f"[{rest[:-1]}]")
    except json.JSONDecodeError:
        return None
    return name, args


# -- reading again ----------------------------------------------------------------------------------


async def read_again(
    handed: b.HandedOver, workflow: Workflow, run: RunRecord, journal: Journal, step_id: str
) -> tuple[list[b.FactCheck], list[str]]:
    """Read every relied-on value again, through its resolver or verifier: the checks made,
    and the names of values nothing can read again (facts a deterministic step set, from the
    run's own data). A value that cannot be read again counts as changed."""
    checked: list[b.FactCheck] = []
    unchecked: list[str] = []
    verified: dict[str, dict[str, Any]] = {}  # a verifier runs once per step it verified
    executed: dict[str | None, b.Executed] | None = None
    for fact in handed.relied_on:
        if fact.reader in ("step", "answer"):  # what a step derived or a person said: not re-read
            unchecked.append(fact.name)
            continue
        try:
            if fact.reader == "resolver":
                now = _resolve(fact, workflow, run, step_id)
                if inspect.isawaitable(now):  # an asynchronous resolver
                    now = await now
            else:
                if executed is None:
                    executed = {
                        e.step_id: r
                        for e in await journal.read_entries(run.run_id)
                        if e.step_id and isinstance(r := e.body, b.Executed)
                    }
                now = await _verify(fact, workflow, run, executed, verified)
        except Exception as exc:  # a value that cannot be read again is not known to be the same
            checked.append(b.FactCheck(fact.name, fact.value, None, True, f"{type(exc).__name__}: {exc}"))
            continue
        now = json.loads(encode_json(now))  # as the journal holds values, for a like-for-like comparison
        checked.append(b.FactCheck(fact.name, fact.value, now, encode_json(now) != encode_json(fact.value)))
    return checked, unchecked


def _context(run: RunRecord, step_id: str) -> ToolContext:
    return ToolContext(
        run_id=run.run_id,
        step_id=step_id,
        idempotency_key=f"{run.run_id}:{step_id}",
        data=MappingProxyType(run.data),
        facts=MappingProxyType(run.facts),
    )


def _resolve(fact: b.ReliedFact, workflow: Workflow, run: RunRecord, step_id: str) -> Any:
    fn = workflow.resolvers.get(fact.resolver or "")
    if fn is None:
        raise LookupError(f"the workflow has no resolver {fact.resolver!r} now")
    return fn(_context(run, step_id), *fact.args)


async def _verify(
    fact: b.ReliedFact,
    workflow: Workflow,
    run: RunRecord,
    executed: dict[str | None, b.Executed],
    verified: dict[str, dict[str, Any]],
) -> Any:
    """A verifier's fact, established again by running the verifier on the same call (its
    arguments, its recorded result, its step's idempotency key)."""
    step = fact.step_id or ""
    if step not in verified:
        call = executed.get(step)
        tool = workflow.tools().get(fact.tool or "")
        if call is None or tool is None or tool.verifier is None:
            raise LookupError(f"nothing verifies {fact.tool}'s call of step {step} now")
        evidence = await tool.verify(call.args, call.result, _context(run, step))
        if evidence is None or not evidence.ok:
            raise LookupError(f"{fact.tool}'s verifier no longer shows the effect of step {step}")
        verified[step] = evidence.facts
    name = fact.name.removeprefix("facts.")
    if name not in verified[step]:
        raise LookupError(f"{fact.tool}'s verifier no longer establishes {fact.name}")
    return verified[step][name]
