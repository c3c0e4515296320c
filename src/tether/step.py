"""The governed step: one proposal, taken through every stage, recorded.

    parse -> scope -> arguments -> budget & loop -> policy -> [approval] -> execute
          -> verify -> record -> next-step decision

Nothing a model emits runs unless it passes every stage before `execute`. A refusal is
recorded with its reason code and fed back to the model as an observation. For a
`write` or `external` tool an intent is committed (and synced) before the tool runs, so a
crash in between leaves the step visibly in doubt instead of silently repeated.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from tether.hashing import fingerprint
from tether.journal import NewEntry, Ticket
from tether.models.protocol import Usage
from tether.policy import Decision
from tether.proposals import (
    Exit,
    Finish,
    Handoff,
    MalformedProposal,
    Question,
    ToolCall,
    parse_proposal,
)
from tether.reasons import ReasonCode
from tether.run import RunCursor, messages_for
from tether.tools import ArgumentError, Tool, ToolContext
from tether.workflow import AgentState

OutcomeKind = Literal["continue", "transition", "pause", "escalate", "fail", "handoff"]


@dataclass
class StepOutcome:
    """What the runtime does next, decided by the step."""

    kind: OutcomeKind
    to: str | None = None
    reason_code: str | None = None
    message: str = ""
    owner: str | None = None
    update: dict[str, Any] = field(default_factory=dict)
    consume: tuple[str, str] | None = None


CONTINUE = StepOutcome("continue")


def runtime_decision(cursor: RunCursor, stage: str, code: ReasonCode, reason: str) -> Decision:
    """A refusal made by the runtime before policy, recorded in the same shape."""
    return Decision(
        decision="deny",
        rule_id=f"runtime:{stage}",
        policy_hash=cursor.policy.hash,
        reason_code=code,
        reason=reason,
    )


class GovernedStep:
    def __init__(
        self, cursor: RunCursor, state: AgentState, usage: Usage, step_id: str | None = None
    ) -> None:
        """A new step, or (with `step_id`) the continuation of a paused one."""
        self.cursor = cursor
        self.state = state
        self.usage = usage
        self.step_id = step_id or cursor.new_step_id()

    async def run(self, raw: Any) -> StepOutcome:
        try:
            proposal = parse_proposal(raw)
        except MalformedProposal as exc:
            return await self.refuse(
                None, runtime_decision(self.cursor, "parse", ReasonCode.MALFORMED_OUTPUT, str(exc)), raw=raw
            )
        if isinstance(proposal, ToolCall):
            return await self.tool_call(proposal)
        if isinstance(proposal, Exit | Finish):
            return await self.exit(proposal)
        if isinstance(proposal, Question):
            return await self.question(proposal)
        return await self.handoff(proposal)

    # -- stages for a tool call ------------------------------------------------------

    async def tool_call(self, proposal: ToolCall) -> StepOutcome:
        tool = self.state.tool(proposal.tool)
        if tool is None:
            return await self.refuse(proposal, self._scope_refusal(proposal.tool))
        try:
            args = tool.validate(proposal.args)
        except ArgumentError as exc:
            return await self.refuse(
                proposal, runtime_decision(self.cursor, "arguments", ReasonCode.INVALID_ARGUMENTS, str(exc))
            )
        args_hash = fingerprint({"tool": tool.name, "args": args})
        visit, budget = self.cursor.visit, self.state.budget
        run_limit = self.cursor.workflow.budget.max_tool_calls
        if visit["tool_calls"] >= budget.max_tool_calls or (
            run_limit is not None and self.cursor.total("tool_calls") >= run_limit
        ):
            reason = (
                f"tool-call budget of {budget.max_tool_calls} for this state is spent"
                if visit["tool_calls"] >= budget.max_tool_calls
                else f"the run's tool-call budget of {run_limit} is spent"
            )
            await self.refuse(
                proposal,
                runtime_decision(self.cursor, "budget", ReasonCode.BUDGET_EXHAUSTED, reason),
                args_hash=args_hash,
            )
            return StepOutcome(
                _on_exhausted(self.state),
                reason_code=ReasonCode.BUDGET_EXHAUSTED,
                message=reason,
                owner=self.state.escalate_to,
            )
        # Only the last call is kept: the checkpoint stays the same size however long the run.
        repeats = visit["repeats"] + 1 if visit["last_call"] == args_hash else 1
        visit["last_call"], visit["repeats"] = args_hash, repeats
        if repeats > budget.max_repeats:
            reason = (
                f"{tool.name} proposed {repeats} times with the same arguments (limit {budget.max_repeats})"
            )
            await self.refuse(
                proposal,
                runtime_decision(self.cursor, "loop", ReasonCode.LOOP_DETECTED, reason),
                args_hash=args_hash,
            )
            return StepOutcome(
                "escalate", reason_code=ReasonCode.LOOP_DETECTED, message=reason, owner=self.state.escalate_to
            )
        info = {
            "name": tool.name,
            "effect": tool.effect,
            "idempotent": tool.idempotent,
            "effect_declared": tool.effect_declared,
        }
        decision = self.cursor.decide(kind="tool", tool=info, args=args, step_id=self.step_id)
        blocked = await self.unless_allowed(proposal, decision, tool.name, args, args_hash)
        return blocked or await self.execute(tool, proposal, args, args_hash, decision)

    async def unless_allowed(
        self, proposal: Any, decision: Decision, subject: str, args: dict[str, Any], args_hash: str
    ) -> StepOutcome | None:
        """Carry out a deny, defer or ask; None when the decision allows going on."""
        if decision.decision == "deny":
            return await self.refuse(proposal, decision, args_hash=args_hash)
        if decision.decision == "defer":
            return await self.defer(proposal, decision, args_hash)
        if decision.decision == "ask":
            return await self.ask(proposal, decision, subject, args, args_hash)
        return None

    async def execute(
        self,
        tool: Tool,
        proposal: ToolCall,
        args: dict[str, Any],
        args_hash: str,
        decision: Decision,
        ticket_id: str | None = None,
    ) -> StepOutcome:
        cursor = self.cursor
        cursor.count("tool_calls")
        key = f"{cursor.run_id}:{self.step_id}"
        base = {
            "proposal": proposal.model_dump(),
            "args": args,
            "args_hash": args_hash,
            "decision": decision.model_dump(mode="json"),
            "idempotency_key": key,
            "tool": {"name": tool.name, "effect": tool.effect, "idempotent": tool.idempotent},
            "ticket_id": ticket_id,
            "usage": self.usage.model_dump(),
            "continuation": ticket_id is not None,
        }
        consume = (ticket_id, args_hash) if ticket_id else None
        if tool.effect != "read":
            await cursor.commit(
                [NewEntry(kind="intent", step_id=self.step_id, state=self.state.name, body=base)],
                consume=consume,
                durable=True,
            )
            consume = None
        return await self.finish_execution(tool, args, base, consume)

    async def finish_execution(
        self, tool: Tool, args: dict[str, Any], base: dict[str, Any], consume: tuple[str, str] | None = None
    ) -> StepOutcome:
        """Run the tool, verify its effect, and record the step with the checkpoint."""
        cursor = self.cursor
        ctx = ToolContext(
            run_id=cursor.run_id,
            step_id=self.step_id,
            idempotency_key=base["idempotency_key"],
            data=cursor.record.data,
            facts=cursor.record.facts,
        )
        source = {"kind": "tool", "tool": tool.name, "effect": tool.effect}
        try:
            result = await tool.call(args, ctx)
        except Exception as exc:  # a tool's failure is recorded, never a crash of the run
            error = f"{type(exc).__name__}: {exc}"
            body = {
                **base,
                "outcome": "tool_error",
                "reason_code": ReasonCode.TOOL_ERROR,
                "error": error,
                "source": source,
                "observation": {
                    "step_id": self.step_id,
                    "outcome": "tool_error",
                    "reason_code": ReasonCode.TOOL_ERROR,
                    "error": error,
                },
            }
            await cursor.commit([self._entry(body)], consume=consume)
            self._observe(body)
            return CONTINUE
        verification, facts, failed = await self._verify(tool, args, result, ctx)
        outcome = "verification_failed" if failed else "executed"
        # The model also sees `result` and `verification`; they are stored once, in the body.
        observation: dict[str, Any] = {"step_id": self.step_id, "outcome": outcome}
        body = {
            **base,
            "outcome": outcome,
            "result": result,
            "source": source,
            "verification": verification,
            "observation": observation,
            # Reason codes explain refusals and failures; a verified execution has none.
            "reason_code": ReasonCode.VERIFICATION_FAILED if failed else None,
        }
        new_facts = {**cursor.record.facts, **facts} if facts else None
        await cursor.commit([self._entry(body)], facts=new_facts, consume=consume)
        self._observe(body)
        cursor.executed(body, self.step_id, self.state.name)
        if failed and self.state.on_verification_failed != "retry":
            return StepOutcome(
                self.state.on_verification_failed,
                reason_code=ReasonCode.VERIFICATION_FAILED,
                message=str(verification),
                owner=self.state.escalate_to,
            )
        return CONTINUE

    async def _verify(
        self, tool: Tool, args: dict[str, Any], result: Any, ctx: ToolContext
    ) -> tuple[dict[str, Any] | None, dict[str, Any], bool]:
        try:
            evidence = await tool.verify(args, result, ctx)
        except Exception as exc:  # a verifier that crashes has not shown the effect
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, {}, True
        if evidence is None:
            if tool.effect == "read":
                return None, {}, False
            # An effect nobody re-read: recorded as unshown, not as a failure.
            return (
                {
                    "ok": None,
                    "reason_code": ReasonCode.EVIDENCE_MISSING,
                    "detail": "the tool declares no verifier; its effect was not re-read",
                },
                {},
                False,
            )
        return evidence.model_dump(), evidence.facts if evidence.ok else {}, not evidence.ok

    # -- stages for exits, questions and handoffs ------------------------------------

    async def exit(self, proposal: Exit | Finish) -> StepOutcome:
        name = proposal.exit if isinstance(proposal, Exit) else "finish"
        target = self.state.exits.get(name)
        if target is None:
            allowed = ", ".join(sorted(self.state.exits))
            return await self.refuse(
                proposal,
                runtime_decision(
                    self.cursor,
                    "scope",
                    ReasonCode.OUT_OF_SCOPE,
                    f"exit {name!r} is not allowed in state {self.state.name!r} (allowed: {allowed})",
                ),
            )
        args = {"exit": name, "update": proposal.update}
        args_hash = fingerprint(args)
        decision = self.cursor.decide(
            kind="exit", tool={"name": name, "effect": "exit"}, args=args, step_id=self.step_id
        )
        blocked = await self.unless_allowed(proposal, decision, f"exit:{name}", args, args_hash)
        return blocked or await self.take_exit(proposal, decision, name, target, args_hash)

    async def take_exit(
        self,
        proposal: Exit | Finish,
        decision: Decision,
        name: str,
        target: str,
        args_hash: str,
        ticket_id: str | None = None,
    ) -> StepOutcome:
        body = {
            "proposal": proposal.model_dump(),
            "args_hash": args_hash,
            "decision": decision.model_dump(mode="json"),
            "outcome": "transition",
            "reason_code": None,
            "exit": name,
            "next": target,
            "ticket_id": ticket_id,
            "continuation": ticket_id is not None,
            "usage": self.usage.model_dump(),
            "observation": {"step_id": self.step_id, "outcome": "transition", "to": target},
        }
        self.cursor.record.data = {**self.cursor.record.data, **proposal.update}
        consume = (ticket_id, args_hash) if ticket_id else None
        return StepOutcome("transition", to=target, update=body, consume=consume)

    async def question(self, proposal: Question) -> StepOutcome:
        decision = Decision(
            decision="ask",
            rule_id="runtime:question",
            policy_hash=self.cursor.policy.hash,
            reason_code=ReasonCode.APPROVAL_REQUIRED,
            reason="the model asked a person",
            approver=self.state.escalate_to,
            expires_in=24 * 3600.0,
        )
        args = {"question": proposal.question}
        return await self.ask(proposal, decision, "question", args, fingerprint(args), kind="question")

    async def handoff(self, proposal: Handoff) -> StepOutcome:
        allowed = {*self.state.handoff_to, self.state.escalate_to}
        if proposal.to not in allowed:
            return await self.refuse(
                proposal,
                runtime_decision(
                    self.cursor,
                    "scope",
                    ReasonCode.OUT_OF_SCOPE,
                    f"handoff to {proposal.to!r} is not allowed (allowed: {', '.join(sorted(allowed))})",
                ),
            )
        decision = Decision(
            decision="defer",
            rule_id="runtime:handoff",
            policy_hash=self.cursor.policy.hash,
            reason_code=ReasonCode.DEFERRED,
            reason=proposal.note,
            owner=proposal.to,
        )
        return await self.defer(proposal, decision, fingerprint(proposal.model_dump()))

    # -- outcomes that stop here -----------------------------------------------------

    async def refuse(
        self,
        proposal: Any,
        decision: Decision,
        *,
        raw: Any = None,
        args_hash: str | None = None,
        continuation: bool = False,
    ) -> StepOutcome:
        """Record a refusal; the model sees why and may try something else."""
        observation = {
            "step_id": self.step_id,
            "outcome": "refused",
            "reason_code": decision.reason_code,
            "reason": decision.reason,
        }
        body = {
            "proposal": proposal.model_dump() if proposal is not None else None,
            "raw": raw if proposal is None else None,
            "args_hash": args_hash,
            "decision": decision.model_dump(mode="json"),
            "outcome": "refused",
            "reason_code": decision.reason_code,
            "usage": self.usage.model_dump(),
            "observation": observation,
            "continuation": continuation,
        }
        await self.cursor.commit([self._entry(body)])
        self._observe(body)
        return CONTINUE

    async def ask(
        self,
        proposal: Any,
        decision: Decision,
        subject: str,
        args: dict[str, Any],
        args_hash: str,
        kind: Literal["approval", "question"] = "approval",
    ) -> StepOutcome:
        """Pause durably with a single-use ticket bound to the exact arguments."""
        now = self.cursor.clock()
        ticket = Ticket(
            ticket_id="tkt_" + secrets.token_hex(6),
            run_id=self.cursor.run_id,
            step_id=self.step_id,
            kind=kind,
            subject=subject,
            args=args,
            args_hash=args_hash,
            approver=decision.approver or self.state.escalate_to,
            question=args.get("question") if kind == "question" else None,
            created_at=now,
            expires_at=now + (decision.expires_in or 24 * 3600.0),
        )
        outcome = "awaiting_answer" if kind == "question" else "awaiting_approval"
        body = {
            "proposal": proposal.model_dump(),
            "args_hash": args_hash,
            "decision": decision.model_dump(mode="json"),
            "outcome": outcome,
            "reason_code": decision.reason_code,
            "ticket_id": ticket.ticket_id,
            "usage": self.usage.model_dump(),
            "observation": {"step_id": self.step_id, "outcome": outcome, "ticket_id": ticket.ticket_id},
        }
        self.cursor.checkpoint["pending"] = {
            "step_id": self.step_id,
            "ticket_id": ticket.ticket_id,
            "proposal": proposal.model_dump(),
            "decision": decision.model_dump(mode="json"),
        }
        await self.cursor.commit(
            [self._entry(body)],
            status="paused",
            tickets=[ticket],
            owner=ticket.approver,
            reason_code=decision.reason_code,
            message=f"waiting on ticket {ticket.ticket_id} ({ticket.approver})",
        )
        self._observe(body)
        return StepOutcome("pause", reason_code=decision.reason_code, owner=ticket.approver)

    async def defer(self, proposal: Any, decision: Decision, args_hash: str) -> StepOutcome:
        """Hand the run to a named owner, with the state handed over kept apart."""
        cursor = self.cursor
        handed = {
            "owner": decision.owner,
            "state": self.state.name,
            "data": cursor.record.data,
            "facts": cursor.record.facts,
            "pending_proposal": proposal.model_dump(),
            "note": decision.reason,
            "at_seq": cursor.record.last_seq,
        }
        body = {
            "step_id": self.step_id,
            "proposal": proposal.model_dump(),
            "args_hash": args_hash,
            "decision": decision.model_dump(mode="json"),
            "outcome": "handoff",
            "reason_code": decision.reason_code,
            "handoff": handed,
            "usage": self.usage.model_dump(),
        }
        return StepOutcome(
            "handoff",
            reason_code=ReasonCode.DEFERRED,
            owner=decision.owner,
            message=decision.reason,
            update=body,
        )

    # -- helpers ---------------------------------------------------------------------

    def _scope_refusal(self, name: str) -> Decision:
        allowed = ", ".join(t.name for t in self.state.tools) or "none"
        if name in self.cursor.workflow.tools():
            return runtime_decision(
                self.cursor,
                "scope",
                ReasonCode.OUT_OF_SCOPE,
                f"tool {name!r} is not allowed in state {self.state.name!r} (allowed: {allowed})",
            )
        return runtime_decision(
            self.cursor, "scope", ReasonCode.UNKNOWN_TOOL, f"no tool named {name!r} (allowed here: {allowed})"
        )

    def _entry(self, body: dict[str, Any]) -> NewEntry:
        return NewEntry(kind="step", step_id=self.step_id, state=self.state.name, body=body)

    def _observe(self, body: dict[str, Any]) -> None:
        self.cursor.transcript.extend(messages_for(body))


def _on_exhausted(state: AgentState) -> OutcomeKind:
    return "escalate" if state.on_budget_exhausted == "escalate" else "fail"
