"""The body of every journal entry, typed: the journal's schema (body format 2).

An entry row is (run_id, seq, kind, step_id, state, body, hash, created_at).
`kind` names the type of the body — one of the records below, the tag of a tagged union —
and `body` is that record encoded once as canonical JSON (sorted keys, no whitespace,
fields at their default left out); the hash covers that text. docs/journal.md describes
every record with an example.

Governed steps (one proposal each; `step_id` set):
    refused, awaiting_approval, awaiting_answer, intent, executed, verification_failed,
    tool_failed, transition, handoff, handoff_received, handoff_returned, answered,
    unanswered, effect_in_doubt, effect_settled
Deterministic steps: step_done, step_failed
The run: run_started, run_finished, escalated, failed, ticket_decided, approval_given, migrated,
crashed, upstream_restarted
People acting on a run (tether.operations): cancelled, retried, taken_over, ticket_expired
Rollback (tether.compensation; `step_id` set to the compensation's own step):
    rollback_started, compensation_intent, compensated, compensation_failed,
    compensation_refused, compensation_in_doubt, rolled_back

A step's decision is stored without the policy hash (the run's, from `run_started` and
`migrated`) and without the per-rule results (`Decision.stored`). What the model sees of a
step (its transcript messages) and what conditions see of it (`history`) are derived from
these records, never stored twice.

Format 1 (tether before kernel v2) stored every step as kind `step` with an `outcome` field
and redundant copies; `decode` reads those entries into the same records, so older
journals keep resuming and verifying unchanged (their stored text is what their hashes cover).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from tether.decision import Decision
from tether.identity import Principal
from tether.proposals import Exit, Finish, Handoff, Proposal, Question, ToolCall, as_dict

FORMAT = 2


class Usage(msgspec.Struct, omit_defaults=True, frozen=True):
    """What the model call that proposed a step cost (left out when nothing)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0


class Body(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Every record; `KINDS` names the entry kind each is stored under."""


# -- governed steps ------------------------------------------------------------------


class StepRecord(Body, kw_only=True):
    """Fields every governed step may carry. `continuation` marks the second half of a step
    that paused (an approved call, a refusal after a denial): its proposal is already in the
    transcript. `call_id` is the id an agent framework gave the call (tether.external): how
    a call presented again is recognised, covered by the entry's hash like the rest."""

    usage: Usage | None = None
    continuation: bool = False
    call_id: str | None = None


class Refused(StepRecord, kw_only=True):
    """Refused before execution; the model is told why. `raw` is unparseable output."""

    decision: Decision
    proposal: Proposal | None = None
    raw: Any = None
    args_hash: str | None = None


class AwaitingApproval(StepRecord, kw_only=True):
    """Paused on a ticket bound to `args_hash`."""

    proposal: Proposal
    decision: Decision
    ticket_id: str
    args_hash: str


class AwaitingAnswer(AwaitingApproval, kw_only=True):
    """Paused on a question for a person."""


class ToolStep(StepRecord, kw_only=True):
    """A call that passed every stage: the validated `args` (`proposed_args` only when the
    model's differ, e.g. a date normalized) and the ticket that approved it, if any."""

    tool: str
    args: dict[str, Any]
    decision: Decision
    args_hash: str | None = None
    proposed_args: dict[str, Any] | None = None
    ticket_id: str | None = None
    # Re-run after a crash (idempotent tools only, with the same idempotency key).
    recovered: bool = False

    def proposal(self) -> ToolCall:
        return ToolCall(self.tool, self.args if self.proposed_args is None else self.proposed_args)


class Intent(ToolStep, kw_only=True):
    """Written and synced before a `write` or `external` tool runs."""


class Executed(ToolStep, kw_only=True):
    result: Any = None
    # The verifier's evidence; None for a read without a verifier.
    verification: dict[str, Any] | None = None
    # The tool declares its results untrusted content (others wrote them): where a value
    # seen in `result` came from, for provenance (tether.provenance).
    untrusted: bool = False


class VerificationFailed(Executed, kw_only=True):
    pass


class ToolFailed(ToolStep, kw_only=True):
    error: str
    untrusted: bool = False  # as for `Executed`: the error text is the tool's content


class Carried(msgspec.Struct, omit_defaults=True, frozen=True):
    """What the run's row must hold as a visit opens, carried by the entry that opens it:
    the run's facts and the hashes it is pinned to, as the chain before it makes them.

    A resume checks the row against the chain from the current visit's opening on (the
    entries it acts on), starting from these values, instead of folding every entry of
    the run (tether.journal.integrity); `tether audit verify` checks them against the
    entries before them."""

    workflow_hash: str
    policy_hash: str
    facts: dict[str, Any] = {}


class Transition(StepRecord, kw_only=True):
    """The model took exit `exit` to state `next` (whose visit this entry opens)."""

    proposal: Exit | Finish
    decision: Decision
    exit: str
    next: str
    args_hash: str | None = None
    ticket_id: str | None = None
    carried: Carried | None = None


class ChangedEffect(msgspec.Struct, omit_defaults=True):
    """An effect the run carried out before the handoff (a `write` or `external` call)."""

    step_id: str
    state: str
    tool: str
    effect: str
    args: dict[str, Any] = {}
    verified: bool | None = None  # None: no verifier re-read it


class ReliedFact(msgspec.Struct, omit_defaults=True):
    """A value the sender relied on, with what can read it again.

    `reader` is `resolver` (a policy lookup: `name` is the call, `order_status("A-1")`,
    `resolver` and `args` how to make it again), `verifier` (a fact a tool's verifier
    established: `name` is `facts.NAME`, `tool` the verified tool; re-read by running the
    verifier again on the call of `step_id`), `step` (a fact a deterministic step set:
    derived from the run's own data, not re-read), or `answer` (a fact a person's answer
    set, in step `step_id`: what they said, not re-read).
    """

    name: str
    reader: Literal["resolver", "verifier", "step", "answer"]
    value: Any = None
    step_id: str | None = None
    resolver: str | None = None
    args: list[Any] = []
    tool: str | None = None


class HandedOver(msgspec.Struct, omit_defaults=True):
    """What a handoff carries, apart from the transcript: the state of the work (`data`,
    `facts`), the owner of the next step (`owner`, or `to_state`, an agent state of the
    workflow that receives it), what changed (`changed`), what is open (`risks`,
    `questions`, a `pending_proposal` a rule deferred) and what it relied on (`relied_on`).
    Handoffs recorded before these fields existed hold only the first seven."""

    owner: str
    state: str
    data: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    pending_proposal: Any = None
    note: str = ""
    at_seq: int = 0
    to_state: str | None = None
    changed: list[ChangedEffect] = []
    risks: list[str] = []
    questions: list[str] = []
    relied_on: list[ReliedFact] = []


class HandedOff(StepRecord, kw_only=True):
    proposal: Proposal
    decision: Decision
    handoff: HandedOver
    args_hash: str | None = None


class FactCheck(msgspec.Struct, omit_defaults=True):
    """One relied-on value read again by a handoff's receiver."""

    name: str
    then: Any = None
    now: Any = None
    changed: bool = False
    error: str | None = None  # why it could not be read again (counts as changed)


class HandoffReceived(StepRecord, kw_only=True):
    """The receiver read every relied-on value again and found none changed; it acts on the
    handoff: `by` a person (the run stays handed off, now theirs), or the agent state
    `to_state` (whose visit this record opens; its model sees the handoff, not the transcript).
    `unchecked` names the values nothing can read again (facts of deterministic steps)."""

    by: str
    checked: list[FactCheck] = []
    unchecked: list[str] = []
    to_state: str | None = None
    handoff: HandedOver | None = None  # what an agent state receives (its model sees it)
    continuation: bool = True


class HandoffReturned(StepRecord, kw_only=True):
    """A relied-on value changed between handoff and pickup: the handoff is turned back to
    the sending state, whose model is told what changed, instead of acting on stale state."""

    by: str
    differences: list[FactCheck]
    checked: list[FactCheck] = []
    continuation: bool = True


class Answered(StepRecord, kw_only=True):
    """A person answered the model's question (the `person` message of the transcript)."""

    ticket_id: str
    answer: str | None = None
    by: str | None = None
    reason: str | None = None
    continuation: bool = True
    # The fact the answer established (`facts.NAME`, the question's `fact`): its source is
    # this entry.
    fact: str | None = None


class Unanswered(Answered, kw_only=True):
    """The question was declined or expired."""

    reason_code: str | None = None


class EffectInDoubt(ToolStep, kw_only=True):
    """An intent with no result after a crash, for a tool that is not idempotent."""

    message: str = ""


class EffectSettled(StepRecord, kw_only=True):
    """A person said whether an effect in doubt happened. The model sees the call (its
    intent never reached the transcript) and what the person said."""

    tool: str
    args: dict[str, Any] = {}
    done: bool
    by: str
    note: str = ""

    def proposal(self) -> ToolCall:
        return ToolCall(self.tool, self.args)


# -- deterministic steps -------------------------------------------------------------------


class CarriedHistory(msgspec.Struct, omit_defaults=True, frozen=True):
    """Tool calls carried into a run's `history` from the runs before it (an MCP gateway
    session's, tether.mcp.gateway_lanes), oldest first, each as policy conditions see a call
    in `history` (`tether.run.history_item`); `runs[i]` is the run `calls[i]` was executed
    in. `cut`: how many earlier calls were left out (the carry is bounded): a decision that a
    rule reading `history` takes part in is then refused (`history_incomplete`), since what
    was left out could change it."""

    calls: list[dict[str, Any]] = []
    runs: list[str] = []
    cut: int = 0


class StepDone(Body, kw_only=True):
    """A deterministic step moved the run on (to `next`, whose visit this entry opens).
    `history`: calls it carried into the run's `history` (absent in entries before it existed,
    and when it carried none)."""

    next: str
    update: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    carried: Carried | None = None
    history: CarriedHistory | None = None


class StepFailed(Body, kw_only=True):
    error: str


# -- the run ---------------------------------------------------------------------------


class WorkflowRef(msgspec.Struct, omit_defaults=True):
    name: str
    version: str
    hash: str
    ref: str = ""
    # The skills its states are made from, `NAME@VERSION` -> the skill's hash (tether.skills).
    skills: dict[str, str] = {}


class RunStarted(Body, kw_only=True):
    workflow: WorkflowRef
    policy_hash: str
    input: dict[str, Any] = {}
    model: str | None = None
    # Who started the run (tether.identity); absent for runs started before principals, or by
    # code that named nobody.
    started_by: Principal | None = None


class RunFinished(Body, kw_only=True):
    status: Literal["completed", "failed"]
    data: dict[str, Any] = {}


class Escalated(Body, kw_only=True):
    reason_code: str | None = None
    message: str | None = None
    owner: str | None = None
    data: dict[str, Any] = {}
    facts: dict[str, Any] = {}


class Failed(Escalated, kw_only=True):
    pass


class Crashed(Body, kw_only=True):
    """Driving the run raised an unexpected error; `retry_in` seconds until it may be
    claimed again (None: it failed for good)."""

    error: str
    crashes: int
    retry_in: float | None = None


class UpstreamRestarted(Body, kw_only=True):
    """An upstream server the run's tools call (an MCP gateway's) went away and was started
    again (`restart`: its count of restarts in that gateway, `at`: when the new connection was
    made). Written with the step whose call went out first on the new connection (`step_id`),
    just before that step's outcome: what the server held in memory may be lost."""

    upstream: str
    restart: int
    at: float


class TicketDecided(Body, kw_only=True):
    """A ticket was decided, `by` the authenticated principal (tether.identity). Entries
    recorded before principals (a free-text `by`) are read with `by` as `Principal.legacy`.

    Edit-and-approve: `edited_args` are the arguments the approver set (the call the run
    executes), `args_hash` their hash, `original_args_hash` the hash of those proposed.
    Under `approvals: N`, `approvers` lists every principal id that approved (each also
    has its `approval_given` entry)."""

    ticket_id: str
    status: str
    by: Principal
    reason: str = ""
    answer: str | None = None
    args_hash: str | None = None
    edited_args: dict[str, Any] | None = None
    original_args_hash: str | None = None
    approvers: list[str] = []


class ApprovalGiven(Body, kw_only=True):
    """One approval of a ticket that needs several distinct approvers (`approvals: N`),
    bound to `args_hash`: approval `count` of `required`. The last one is followed by the
    ticket's `ticket_decided`. An approver who edited the arguments records the edit here."""

    ticket_id: str
    by: Principal
    args_hash: str
    count: int
    required: int
    reason: str = ""
    edited_args: dict[str, Any] | None = None
    original_args_hash: str | None = None


class Version(msgspec.Struct, omit_defaults=True):
    version: str
    hash: str
    policy_hash: str
    ref: str = ""


class Migrated(Body, kw_only=True):
    from_: Version = msgspec.field(name="from")
    to: Version
    by: str


# -- people acting on a run (tether.operations) ------------------------------------------


class Cancelled(Body, kw_only=True):
    """A person cancelled the run (`from_status` is what it was); with `rollback` the
    compensations of its effects follow (`rollback_started` ... `rolled_back`).
    `ticket_id` is a pending ticket withdrawn with it."""

    by: Principal
    reason: str = ""
    from_status: str
    rollback: bool = False
    ticket_id: str | None = None


class Retried(Body, kw_only=True):
    """A person sent the run back into `state` with a fresh visit budget (a new visit,
    whose transcript starts empty); it is queued for a worker or `tether resume`."""

    by: Principal
    note: str = ""
    from_status: str
    state: str
    reason_code: str | None = None  # why the run had stopped


class TakenOver(Body, kw_only=True):
    """A person chose the exit `exit` of the run's state (to `next`) with `data`, in place
    of the model; checked like a model's exit (scope, contract, policy: `decision`)."""

    by: Principal
    exit: str
    next: str
    data: dict[str, Any] = {}
    decision: Decision
    from_status: str
    ticket_id: str | None = None  # a pending ticket withdrawn with it


class TicketExpiredRecord(Body, kw_only=True):
    """The sweeper found a ticket past its deadline (by the store's clock) and expired it;
    `on_expiry` is what the rule said then: `deny`, or `escalate` to `escalated_to`."""

    ticket_id: str
    on_expiry: Literal["deny", "escalate"] = "deny"
    escalated_to: str | None = None
    expired_at: float


# -- rollback (tether.compensation) --------------------------------------------------------


class Uncompensated(msgspec.Struct, omit_defaults=True):
    """An effect a rollback cannot undo, and why (no compensation declared, a value its
    arguments derive from is missing, an effect settled by a person without a result)."""

    step_id: str
    tool: str
    reason: str


class RollbackStarted(Body, kw_only=True):
    """A rollback begins: the effects it will compensate (`effects`, the step ids of their
    `executed` entries, in the order they will be undone: newest first) and those it cannot."""

    by: Principal | None = None  # None: the workflow's `on_failure: rollback`
    reason: str = ""
    effects: list[str] = []
    uncompensated: list[Uncompensated] = []


class CompensationStep(Body, kw_only=True):
    """One compensation: `tool` called with `args` to undo the effect of step `compensates`
    (its tool `of_tool`), decided by policy like any call (`decision`)."""

    compensates: str
    of_tool: str
    tool: str
    args: dict[str, Any] = {}
    args_hash: str | None = None
    decision: Decision | None = None


class CompensationIntent(CompensationStep, kw_only=True):
    """Written and synced before the compensation runs (as an intent is before any write)."""


class Compensated(CompensationStep, kw_only=True):
    result: Any = None
    verification: dict[str, Any] | None = None
    verified: bool = True  # False: its verifier did not find the effect undone
    recovered: bool = False  # re-run after a crash (idempotent compensations only)


class CompensationFailed(CompensationStep, kw_only=True):
    error: str


class CompensationRefused(CompensationStep, kw_only=True):
    """Policy (or the arguments' schema) did not let the compensation run: `reason`."""

    reason: str = ""


class CompensationInDoubt(CompensationStep, kw_only=True):
    """A compensation whose intent has no result after a crash, not idempotent: not re-run."""

    message: str = ""


class RolledBack(Body, kw_only=True):
    """The rollback's outcome, per original step id."""

    compensated: list[str] = []
    failed: list[str] = []
    refused: list[str] = []
    in_doubt: list[str] = []
    uncompensated: list[Uncompensated] = []


KINDS: dict[str, type[Body]] = {
    "refused": Refused,
    "awaiting_approval": AwaitingApproval,
    "awaiting_answer": AwaitingAnswer,
    "intent": Intent,
    "executed": Executed,
    "verification_failed": VerificationFailed,
    "tool_failed": ToolFailed,
    "transition": Transition,
    "handoff": HandedOff,
    "handoff_received": HandoffReceived,
    "handoff_returned": HandoffReturned,
    "answered": Answered,
    "unanswered": Unanswered,
    "effect_in_doubt": EffectInDoubt,
    "effect_settled": EffectSettled,
    "step_done": StepDone,
    "step_failed": StepFailed,
    "run_started": RunStarted,
    "run_finished": RunFinished,
    "escalated": Escalated,
    "failed": Failed,
    "ticket_decided": TicketDecided,
    "approval_given": ApprovalGiven,
    "migrated": Migrated,
    "crashed": Crashed,
    "upstream_restarted": UpstreamRestarted,
    "cancelled": Cancelled,
    "retried": Retried,
    "taken_over": TakenOver,
    "ticket_expired": TicketExpiredRecord,
    "rollback_started": RollbackStarted,
    "compensation_intent": CompensationIntent,
    "compensated": Compensated,
    "compensation_failed": CompensationFailed,
    "compensation_refused": CompensationRefused,
    "compensation_in_doubt": CompensationInDoubt,
    "rolled_back": RolledBack,
}
KIND_OF: dict[type[Body], str] = {cls: kind for kind, cls in KINDS.items()}
# Tool calls whose effect happened: what policy conditions see as `history`.
EXECUTED_KINDS = ("executed", "verification_failed")
# Kinds that hold a governed step's outcome (the model sees them in its transcript).
STEP_KINDS = frozenset(
    {
        "refused",
        "awaiting_approval",
        "awaiting_answer",
        "executed",
        "verification_failed",
        "tool_failed",
        "transition",
        "handoff",
        "handoff_received",
        "handoff_returned",
        "answered",
        "unanswered",
        "effect_settled",
    }
)
_DECODERS = {kind: msgspec.json.Decoder(cls) for kind, cls in KINDS.items()}


class UnknownBody(msgspec.Struct):
    """An entry of a kind this tether does not know (a newer format, or foreign)."""

    kind: str
    body: Any


def decode(kind: str, body_json: str) -> Body | UnknownBody:
    """The typed record an entry holds (format 1 entries are read as their format 2 record)."""
    decoder = _DECODERS.get(kind)
    if decoder is not None:
        try:
            return decoder.decode(body_json)
        except msgspec.ValidationError:
            # Format 1 used some of these kinds too (intent, handoff, escalated, ...).
            return _legacy(kind, msgspec.json.decode(body_json))
    value = msgspec.json.decode(body_json)
    if kind == "step" and isinstance(value, dict):
        return _legacy(kind, value)
    return UnknownBody(kind, value)


def proposed(record: Any) -> Any:
    """What the model proposed for a step: the call, exit, question or handoff as plain
    values, or its raw output when that was not a proposal; None for other records."""
    if isinstance(record, ToolStep | EffectSettled):
        return as_dict(record.proposal())
    if isinstance(record, CompensationStep):  # a rollback's call (no model proposed it)
        return as_dict(ToolCall(record.tool, record.args))
    if isinstance(record, Refused) and record.proposal is None:
        return record.raw
    proposal = getattr(record, "proposal", None)
    return as_dict(proposal) if proposal is not None else None


# -- format 1 ---------------------------------------------------------------------------

_LEGACY_OUTCOMES: dict[str, type[Body]] = {
    "refused": Refused,
    "awaiting_approval": AwaitingApproval,
    "awaiting_answer": AwaitingAnswer,
    "executed": Executed,
    "verification_failed": VerificationFailed,
    "tool_error": ToolFailed,
    "answered": Answered,
    "unanswered": Unanswered,
}


def _legacy(kind: str, body: Any) -> Body | UnknownBody:
    """A format 1 body read as its record; fields format 2 derives are dropped."""
    try:
        return _legacy_record(kind, body)
    except (msgspec.ValidationError, KeyError, TypeError, AttributeError):
        return UnknownBody(kind, body)


def _legacy_record(kind: str, body: dict[str, Any]) -> Body | UnknownBody:
    decision = body.get("decision")
    if decision is not None:
        decision = {k: v for k, v in decision.items() if v is not None and k != "policy_hash"}
    usage = body.get("usage") or None
    if usage is not None and not any(usage.values()):
        usage = None
    common = {"usage": usage, "continuation": bool(body.get("continuation"))}
    if kind in ("intent", "effect_in_doubt"):
        cls: type[Body] = Intent if kind == "intent" else EffectInDoubt
        extra = {"message": body.get("message", "")} if kind == "effect_in_doubt" else {}
        return msgspec.convert(_tool_fields(body, decision) | common | extra, cls)
    if kind == "handoff":
        values = {
            "proposal": body["proposal"],
            "handoff": body["handoff"],
            "args_hash": body.get("args_hash"),
        }
        return msgspec.convert(values | {"decision": decision} | common, HandedOff)
    if kind == "ticket_decided" and isinstance(body.get("by"), str):
        # Decided before principals existed: `by` was free text (docs/journal.md).
        body = body | {"by": msgspec.to_builtins(Principal.legacy(body["by"]))}
    if kind != "step":
        return msgspec.convert(body, KINDS[kind])
    return _legacy_step(body, decision, common)


def _legacy_step(body: dict[str, Any], decision: Any, common: dict[str, Any]) -> Body:
    """A format 1 `step` entry: its `outcome` says which record it is."""
    outcome = body.get("outcome")
    if outcome == "transition" and "exit" not in body:
        return StepDone(next=body["next"], update=body.get("update") or {}, facts=body.get("facts") or {})
    if outcome == "transition":
        keep = ("proposal", "exit", "next", "args_hash", "ticket_id")
        return msgspec.convert({k: body.get(k) for k in keep} | {"decision": decision} | common, Transition)
    if outcome == "step_failed":
        return StepFailed(error=body.get("error", ""))
    if outcome in ("executed", "not_executed") and body.get("resolved_by"):
        return EffectSettled(
            tool=body["tool"]["name"],
            args=body.get("args") or {},
            done=outcome == "executed",
            by=body["resolved_by"],
            note=body.get("note", ""),
            continuation=bool(body.get("continuation")),
        )
    cls = _LEGACY_OUTCOMES[str(outcome)]
    if cls in (Answered, Unanswered):
        seen = body.get("observation") or {}
        values = {"ticket_id": body["ticket_id"], **{k: seen.get(k) for k in ("answer", "by", "reason")}}
        if cls is Unanswered:
            values["reason_code"] = body.get("reason_code")
        return msgspec.convert(values, cls)
    if cls in (Refused, AwaitingApproval, AwaitingAnswer):
        kept = ("proposal", "args_hash", "raw" if cls is Refused else "ticket_id")
        values = {k: body.get(k) for k in kept} | {"decision": decision} | common
        return msgspec.convert({k: v for k, v in values.items() if v is not None}, cls)
    extra = {"error": body.get("error", "")} if cls is ToolFailed else {}
    if cls in (Executed, VerificationFailed):
        extra = {"result": body.get("result"), "verification": body.get("verification")}
    return msgspec.convert(_tool_fields(body, decision) | common | extra, cls)


def _tool_fields(body: dict[str, Any], decision: Any) -> dict[str, Any]:
    proposal = body.get("proposal") or {}
    proposed = proposal.get("args")
    args = body.get("args") or {}
    return {
        "tool": body["tool"]["name"],
        "args": args,
        "decision": decision,
        "args_hash": body.get("args_hash"),
        "proposed_args": proposed if proposed is not None and proposed != args else None,
        "ticket_id": body.get("ticket_id"),
        "recovered": bool(body.get("recovered")),
    }


__all__ = [
    "EXECUTED_KINDS",
    "FORMAT",
    "KINDS",
    "STEP_KINDS",
    "Answered",
    "ApprovalGiven",
    "AwaitingAnswer",
    "AwaitingApproval",
    "Body",
    "Cancelled",
    "Carried",
    "CarriedHistory",
    "ChangedEffect",
    "Compensated",
    "CompensationFailed",
    "CompensationInDoubt",
    "CompensationIntent",
    "CompensationRefused",
    "CompensationStep",
    "Crashed",
    "EffectInDoubt",
    "EffectSettled",
    "Escalated",
    "Executed",
    "Exit",
    "FactCheck",
    "Failed",
    "Finish",
    "HandedOff",
    "HandedOver",
    "Handoff",
    "HandoffReceived",
    "HandoffReturned",
    "Intent",
    "Migrated",
    "Question",
    "Refused",
    "ReliedFact",
    "Retried",
    "RollbackStarted",
    "RolledBack",
    "RunFinished",
    "RunStarted",
    "StepDone",
    "StepFailed",
    "StepRecord",
    "TakenOver",
    "TicketDecided",
    "TicketExpiredRecord",
    "ToolFailed",
    "ToolStep",
    "Transition",
    "Uncompensated",
    "UnknownBody",
    "UpstreamRestarted",
    "Usage",
    "VerificationFailed",
    "Version",
    "WorkflowRef",
    "decode",
    "proposed",
]


# -- what entries say about a run's facts ----------------------------------------------------------


def refreshed(facts: dict[str, Any], differences: list[FactCheck]) -> dict[str, Any]:
    """The run's facts after a turned-back handoff: each fact its verifier established again
    takes its new value, and one the verifier no longer shows is dropped, so the sender's
    next decisions rest on what holds now (resolver values are read at every decision)."""
    current = dict(facts)
    for check in differences:
        name = check.name.removeprefix("facts.")
        if check.name.startswith("facts.") and name in current:
            if check.error is None:
                current[name] = check.now
            else:
                del current[name]
    return current


def facts_after(facts: dict[str, Any], record: Body | UnknownBody) -> dict[str, Any]:
    """The run's facts after an entry, from the entry alone: set by deterministic steps, by
    verifiers, by a person's answer to a question naming a fact, and refreshed by a
    turned-back handoff. The one reading of the chain that the audit (rows against the
    chain) and replay (values before each decision) share with the runtime that wrote it."""
    match record:
        case StepDone():
            return {**facts, **record.facts}
        case VerificationFailed():
            return facts
        case Executed():
            return {**facts, **((record.verification or {}).get("facts") or {})}
        case Unanswered():
            return facts
        case Answered(fact=str(fact), answer=str(answer)):
            return {**facts, fact: answer}
        case HandoffReturned():
            return refreshed(facts, record.differences)
    return facts
