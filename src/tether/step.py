"""The governed step: one proposal, taken through every stage, recorded once.

    budget -> propose -> parse -> scope -> arguments -> budget -> loop -> policy
           -> [approval] -> execute -> verify -> record

A step starts with a model call (`turn`) or with raw output (`take`), and continues a step
that paused (`resume_ticket`, after a person decided its ticket) or that a crash cut off
(`recover`). Each stage is a short method that passes or raises `Refusal`; a refusal is
recorded with its decision and fed back to the model, and nothing refused is executed.
Every write goes through `record`, the one stage that commits: the step's typed record,
the run's checkpoint, any ticket opened or used, in one transaction. For a `write` or
`external` tool an intent is recorded (and synced) before the tool runs, so a crash in
between leaves the step visibly in doubt instead of silently repeated.

The runtime reads what happened from the run's status and state afterwards: a step
returns nothing.
"""

from __future__ import annotations

import contextlib
import math
import reprlib
import secrets
import time
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any, Literal

import msgspec

from tether import budget as limits
from tether import handoffs, sensitive
from tether.decision import Decision, runtime_refusal
from tether.errors import TicketError, TicketExpired
from tether.hashing import encode_json, value_hash
from tether.journal import Entry, ModelExchange, NewEntry, Ticket
from tether.journal import bodies as b
from tether.models.protocol import BudgetLeft, Model, ModelCallError, ModelContext, ModelReply
from tether.observe import NO_OBSERVER, NO_SPAN, ObservedSpan
from tether.proposals import (
    Exit,
    Finish,
    Handoff,
    MalformedProposal,
    Proposal,
    Question,
    ToolCall,
    as_dict,
    json_value_problem,
    parse_proposal,
)
from tether.reasons import ReasonCode
from tether.run import Pending, RunCursor
from tether.sweeper import expired_message
from tether.tools import ArgumentError, Tool, ToolContext, ValidatedArgs
from tether.workflow import AgentState

QUESTION_SECONDS = 24 * 3600.0
# The context of a step nothing observes: one for all (a run waiting on its model is inside it).
NOT_OBSERVED: contextlib.nullcontext[None] = contextlib.nullcontext()
Stop = Literal["escalate", "fail"]


class Refusal(Exception):
    """A stage refused the proposal. With `stop`, the run stops too (a spent budget, a loop)."""

    def __init__(self, decision: Decision, *, args_hash: str | None = None, stop: Stop | None = None) -> None:
        super().__init__(decision.reason)
        self.decision, self.args_hash, self.stop = decision, args_hash, stop


class GovernedStep:
    __slots__ = ("call_id", "cursor", "limits", "span", "state", "step_id", "usage")

    def __init__(self, cursor: RunCursor, state: AgentState, step_id: str | None = None) -> None:
        """A new step, or (with `step_id`) the continuation of a paused or cut-off one."""
        self.cursor = cursor
        self.state = state
        self.limits = cursor.workflow.limits
        self.step_id = step_id or cursor.new_step_id()
        self.usage: b.Usage | None = None
        self.span: ObservedSpan = NO_SPAN  # the step's span while `observed`
        self.call_id: str | None = None  # an agent framework's id for the call (take_external)

    def observed(self, how: str) -> contextlib.AbstractContextManager[None]:
        """The step as a span of the runtime's observer (tether.observe); `record` adds the
        decision to it."""
        if self.cursor.observer is NO_OBSERVER:  # nothing observes: no span, nothing made
            return NOT_OBSERVED
        return self._span(how)

    @contextlib.contextmanager
    def _span(self, how: str) -> Iterator[None]:
        cursor = self.cursor
        attributes = {
            "tether.run_id": cursor.run_id,
            "tether.step_id": self.step_id,
            "tether.state": self.state.name,
            "tether.step": how,
            "tether.policy_hash": cursor.policy.hash,
        }
        with cursor.observer.span("step", f"governed_step {self.state.name}", attributes) as span:
            self.span = span
            try:
                yield
            finally:
                self.span = NO_SPAN

    # -- the model's turn ------------------------------------------------------------

    async def turn(self, model: Model, record_exchanges: bool = True) -> None:
        """Ask the model for a proposal (if the budget allows one), then take it."""
        cursor, state = self.cursor, self.state
        if state.skill is not None and cursor.visit.steps == 0:  # a skill checks its input first
            problem = state.skill.input_problem(cursor.record.data)
            if problem:
                return await self.stop("escalate", ReasonCode.INVALID_ARGUMENTS, problem)
        seconds = cursor.active_seconds()
        spent = limits.before_model_call(
            cursor.visit, cursor.totals, state.budget, cursor.workflow.budget, seconds
        )
        if spent:
            return await self.stop(state.on_budget_exhausted, ReasonCode.BUDGET_EXHAUSTED, spent)
        context = self._context(seconds)
        started = time.monotonic()
        try:
            if cursor.observer is NO_OBSERVER:
                reply = await model.propose(context)
                if not isinstance(reply, ModelReply):
                    raise TypeError(f"propose returned {type(reply).__name__}, expected ModelReply")
            else:
                reply = await self._observed_propose(model, context)
        except Exception as exc:  # a failing model is recorded and escalated, never a crash
            code = exc.reason_code if isinstance(exc, ModelCallError) else ReasonCode.MODEL_ERROR
            message = str(exc) if isinstance(exc, ModelCallError) else f"{type(exc).__name__}: {exc}"
            if record_exchanges:
                cursor.record_exchange(self._exchange(model, started, error=(exc, code, message)))
            return await self.stop("escalate", code, message)
        if record_exchanges and reply.exchange is not None:
            cursor.record_exchange(self._exchange(model, started, reply=reply))
        usage = reply.usage
        # Never negative (an adapter reporting so fails validation; a constructed one is clamped).
        spent_in, spent_out, cost = (
            max(0, usage.input_tokens),
            max(0, usage.output_tokens),
            max(0.0, usage.cost),
        )
        limits.spend_model_call(cursor.visit, cursor.totals, spent_in + spent_out, cost)
        if spent_in or spent_out or cost:
            self.usage = b.Usage(spent_in, spent_out, cost)
        # Many runs answered at once queue behind the store: each waits holding its output
        # only, not the reply around it nor a step's working state and commit (backpressure).
        output = reply.output
        del reply, usage
        await cursor.journal.wait_for_room()
        await self.take(output)

    async def _observed_propose(self, model: Model, context: ModelContext) -> ModelReply:
        """The model call as the observer's `model` span, with its usage."""
        with self.cursor.observer.span(
            "model", f"chat {model.name}", _model_attributes(model, self.step_id)
        ) as call:
            reply = await model.propose(context)
            if not isinstance(reply, ModelReply):
                raise TypeError(f"propose returned {type(reply).__name__}, expected ModelReply")
            reported = getattr(reply, "usage", None)  # a broken adapter's reply crashes below, as before
            call.set(
                {
                    "gen_ai.usage.input_tokens": getattr(reported, "input_tokens", None),
                    "gen_ai.usage.output_tokens": getattr(reported, "output_tokens", None),
                }
            )
        return reply

    def _context(self, seconds: float) -> ModelContext:
        cursor, state, budget = self.cursor, self.state, self.state.budget
        visit = cursor.visit
        tools, exits = state.model_specs()
        # Nothing marked as set: the context lives as long as the model call (a run waiting).
        return ModelContext.model_construct(
            set(),
            run_id=cursor.run_id,
            state=state.name,
            instructions=state.instructions,
            transcript=cursor.transcript.view(),
            tools=tools,
            exits=exits,
            data=cursor.record.data,
            facts_from_answers=dict(state.facts_from_answers),
            budget_left=BudgetLeft(
                steps=budget.max_steps - visit.steps,
                tool_calls=budget.max_tool_calls - visit.tool_calls,
                seconds=budget.max_seconds - seconds,
                tokens=limits.tokens_left(visit, cursor.totals, budget, cursor.workflow.budget),
                cost=budget.max_cost - visit.cost if budget.max_cost else None,
            ),
        )

    async def take_external(self, proposal: dict[str, Any], call_id: str | None) -> None:
        """A proposal made outside tether (an agent framework's tool call, tether.external),
        taken like a model's. The framework's id for the call is written in the step's entries
        (`call_id`): how a call presented again is recognised, under the hash chain, and not
        lost when exchanges are pruned. Nothing else is kept beside the entry: it holds the
        proposal already."""
        self.call_id = call_id
        await self.take(proposal)

    async def refuse(self, raw: dict[str, Any], decision: Decision, args_hash: str | None) -> None:
        """Record `raw` refused by `decision` before any stage took it: a call an agent
        framework presented while its run waits on a ticket (tether.external). Recorded as
        every refusal is (`refused`), as a step of its own; the run's status, owner and pending
        step are left as they are (tether.journal.integrity reads such a refusal, its rule
        naming the ticket the run waits on, as leaving the run waiting)."""
        try:
            proposal: Proposal | None = self.parse(raw)
        except Refusal:  # not a proposal within the limits: recorded as received (or a note)
            proposal = None
        await self.refused(proposal, Refusal(decision, args_hash=args_hash), raw=raw)

    def _exchange(
        self,
        model: Model,
        started: float,
        *,
        reply: ModelReply | None = None,
        error: tuple[BaseException, str, str] | None = None,
    ) -> ModelExchange:
        """The record of one model call, written with the step it served."""
        # What went over the wire is the vendor's (or an attacker's): recorded within limits.
        wire = self.limits.max_output_bytes * 4
        values: dict[str, Any] = {"error": None, "reason_code": None, "request": None, "response": None}
        values["attempts"] = []
        if reply is not None and reply.exchange is not None:
            exchange = reply.exchange
            values["request"] = recordable(exchange.request, self.limits, wire)
            values["response"] = recordable(exchange.response, self.limits, wire)
            values["attempts"] = [a.model_dump() for a in exchange.attempts]
        if error is not None:
            exc, code, message = error
            values |= {"error": message, "reason_code": code}
            if isinstance(exc, ModelCallError):
                values["request"] = recordable(exc.request, self.limits, wire)
                values["attempts"] = [a.model_dump() for a in exc.attempts]
        return ModelExchange.model_construct(
            run_id=self.cursor.run_id,
            seq=self.cursor.next_exchange_seq(),
            step_id=self.step_id,
            state=self.state.name,
            model=model.name,
            created_at=time.time(),
            seconds=round(time.monotonic() - started, 4),
            output=recordable(reply.output, self.limits) if reply is not None else None,
            usage=reply.usage.model_dump() if reply is not None else {},
            **values,
        )

    # -- a proposal, stage by stage --------------------------------------------------------

    async def take(self, raw: Any) -> None:
        """Take raw model output through every stage; record what happened."""
        proposal: Proposal | None = None
        try:
            proposal = self.parse(raw)
            match proposal:
                case ToolCall():
                    await self.tool_call(proposal)
                case Exit() | Finish():
                    await self.exit(proposal)
                case Question():
                    await self.question(proposal)
                case Handoff():
                    await self.handoff(proposal)
        except Refusal as refusal:
            await self.refused(proposal, refusal, raw=raw if proposal is None else None)

    def parse(self, raw: Any) -> Proposal:
        try:
            return parse_proposal(raw, self.limits.output())
        except MalformedProposal as exc:
            raise Refusal(runtime_refusal("parse", ReasonCode.MALFORMED_OUTPUT, str(exc))) from None

    async def tool_call(self, proposal: ToolCall) -> None:
        tool = self.scope(proposal.tool)
        args = self.arguments(tool, proposal.args)
        self.budget(args)
        self.loop(tool, args)
        decision = await self.policy(tool, args, await self.cursor.decision_time())
        if await self.unless_allowed(proposal, decision, tool.name, args.values, args.hash):
            return
        await self.execute(tool, args, decision, proposed=proposal.args)

    def scope(self, name: str) -> Tool:
        tool = self.state.tool(name)
        if tool is not None:
            return tool
        allowed = ", ".join(t.name for t in self.state.tools) or "none"
        if name in self.cursor.workflow.tools():
            reason = f"tool {name!r} is not allowed in state {self.state.name!r} (allowed: {allowed})"
            raise Refusal(runtime_refusal("scope", ReasonCode.OUT_OF_SCOPE, reason))
        reason = f"no tool named {name!r} (allowed here: {allowed})"
        raise Refusal(runtime_refusal("scope", ReasonCode.UNKNOWN_TOOL, reason))

    def arguments(self, tool: Tool, args: dict[str, Any]) -> ValidatedArgs:
        """Validated once, encoded once, fingerprinted once: what every later stage uses."""
        try:
            # The proposal they came with was parsed, so they are JSON within the output limits.
            return tool.validate(args, max_bytes=self.limits.max_args_bytes, checked=True)
        except ArgumentError as exc:
            raise Refusal(runtime_refusal("arguments", ReasonCode.INVALID_ARGUMENTS, str(exc))) from None

    def budget(self, args: ValidatedArgs) -> None:
        cursor = self.cursor
        spent = limits.before_tool_call(
            cursor.visit, cursor.totals, self.state.budget, cursor.workflow.budget
        )
        if spent:
            decision = runtime_refusal("budget", ReasonCode.BUDGET_EXHAUSTED, spent)
            raise Refusal(decision, args_hash=args.hash, stop=self.state.on_budget_exhausted)

    def loop(self, tool: Tool, args: ValidatedArgs) -> None:
        looping = limits.repeated(self.cursor.visit, tool.name, args.hash, self.state.budget)
        if looping:
            decision = runtime_refusal("loop", ReasonCode.LOOP_DETECTED, looping)
            raise Refusal(decision, args_hash=args.hash, stop="escalate")

    async def policy(self, tool: Tool, args: ValidatedArgs, now: float | None = None) -> Decision:
        decision = await self.cursor.decide(
            kind="tool", tool=tool.info, args=args.values, step_id=self.step_id, now=now
        )
        if decision.decision == "deny":
            raise Refusal(decision, args_hash=args.hash)
        return decision

    async def unless_allowed(
        self, proposal: Proposal, decision: Decision, subject: str, args: dict[str, Any], args_hash: str
    ) -> bool:
        """Carry out a defer or an ask; False when the decision allows going on."""
        if decision.decision == "defer":
            await self.defer(proposal, decision, args_hash)
            return True
        if decision.decision == "ask":
            await self.ask(proposal, decision, subject, args, args_hash)
            return True
        return False

    # -- execution ---------------------------------------------------------------------------

    async def execute(
        self,
        tool: Tool,
        args: ValidatedArgs,
        decision: Decision,
        *,
        proposed: dict[str, Any],
        ticket_id: str | None = None,
    ) -> None:
        cursor = self.cursor
        limits.spend_tool_call(cursor.visit, cursor.totals)
        fields: dict[str, Any] = {
            "tool": tool.name,
            "args": args.values,
            "decision": decision.stored(),
            "proposed_args": proposed if proposed != args.values else None,
            "usage": self.usage,
        }
        if ticket_id is not None:
            fields |= {"ticket_id": ticket_id, "continuation": True}
        if tool.effect != "read" or ticket_id is not None:
            fields["args_hash"] = args.hash
        consume = (ticket_id, args.hash) if ticket_id else None
        if tool.effect != "read":
            # The record of an effect about to happen is on disk before the effect.
            await self.record(b.Intent(**fields), consume=consume, durable=True)
            consume = None
        await self.run_tool(tool, args, fields, consume)

    async def run_tool(
        self,
        tool: Tool,
        args: ValidatedArgs,
        fields: dict[str, Any],
        consume: tuple[str, str] | None = None,
    ) -> None:
        """Run the tool, verify its effect, and record the step with the checkpoint."""
        # What the tool returns is someone else's content when it says so (provenance).
        untrusted = tool.results == "untrusted"
        observer = self.cursor.observer
        ctx = self.tool_context()
        try:
            if observer is NO_OBSERVER:
                result = await tool.call(args, ctx)
            else:
                attributes = {
                    "gen_ai.operation.name": "execute_tool",
                    "gen_ai.tool.name": tool.name,
                    "gen_ai.tool.call.id": f"{self.cursor.run_id}:{self.step_id}",
                    "gen_ai.tool.type": "function",
                    "tether.effect": tool.effect,
                }
                with observer.span("tool", f"execute_tool {tool.name}", attributes) as span:
                    ctx = self.tool_context(trace=span.carrier())
                    result = await tool.call(args, ctx)
        except Exception as exc:  # a tool's failure is recorded, never a crash of the run
            error = f"{type(exc).__name__}: {exc}"
            failed_call = b.ToolFailed(**fields, error=error, untrusted=untrusted)
            return await self.record(*_restarted(ctx), failed_call, consume=consume)
        verification, facts, failed = await self.verify(tool, args, result, ctx)
        kind = b.VerificationFailed if failed else b.Executed
        red = self.cursor.redactor  # fingerprinted before a preview of it could be recorded
        shown = red.result(tool.name, result) if red is not None else result
        stored = recordable(shown, self.limits, self.limits.max_result_bytes)
        executed = kind(**fields, result=stored, verification=verification, untrusted=untrusted)
        new_facts = {**self.cursor.record.facts, **facts} if facts else None
        # The upstream restarts the call found, each an entry of its own before the outcome.
        restarted = _restarted(ctx)
        if failed and self.state.on_verification_failed != "retry":
            stop: Stop = self.state.on_verification_failed
            return await self.record(
                *restarted,
                executed,
                self.stopped(stop, ReasonCode.VERIFICATION_FAILED, str(verification)),
                consume=consume,
                facts=new_facts,
            )
        await self.record(*restarted, executed, consume=consume, facts=new_facts)

    def tool_context(self, trace: dict[str, str] | None = None) -> ToolContext:
        cursor = self.cursor
        # Read-only: run data changes only through recorded steps, never behind the journal.
        return ToolContext(
            run_id=cursor.run_id,
            step_id=self.step_id,
            idempotency_key=f"{cursor.run_id}:{self.step_id}",
            data=MappingProxyType(cursor.record.data),
            facts=MappingProxyType(cursor.record.facts),
            trace=MappingProxyType(trace or {}),
        )

    async def verify(
        self, tool: Tool, args: ValidatedArgs, result: Any, ctx: ToolContext
    ) -> tuple[dict[str, Any] | None, dict[str, Any], bool]:
        """Read the resulting state; never take the tool's return value as proof."""
        try:
            evidence = await tool.verify(args.values, result, ctx)
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

    # -- exits, questions and handoffs ---------------------------------------------------

    async def exit(self, proposal: Exit | Finish) -> None:
        name = proposal.exit if isinstance(proposal, Exit) else "finish"
        target = self.state.exits.get(name)
        if target is None:
            allowed = ", ".join(sorted(self.state.exits))
            reason = f"exit {name!r} is not allowed in state {self.state.name!r} (allowed: {allowed})"
            raise Refusal(runtime_refusal("scope", ReasonCode.OUT_OF_SCOPE, reason))
        args = {"exit": name, "update": proposal.update}
        args_hash = value_hash(encode_json(args))
        self.contract(name, proposal.update, args_hash)
        info = {"name": name, "effect": "exit"}
        now = await self.cursor.decision_time()
        decision = await self.cursor.decide(kind="exit", tool=info, args=args, step_id=self.step_id, now=now)
        if decision.decision == "deny":
            raise Refusal(decision, args_hash=args_hash)
        if await self.unless_allowed(proposal, decision, f"exit:{name}", args, args_hash):
            return
        await self.take_exit(proposal, decision, name, target)

    def contract(self, exit: str, update: dict[str, Any], args_hash: str) -> None:
        """A skill's output contract: a success exit's update must satisfy its schema."""
        problem = self.state.skill.output_problem(exit, update) if self.state.skill is not None else None
        if problem:
            decision = runtime_refusal("contract", ReasonCode.INVALID_ARGUMENTS, problem)
            raise Refusal(decision, args_hash=args_hash)

    async def take_exit(
        self,
        proposal: Exit | Finish,
        decision: Decision,
        name: str,
        target: str,
        *,
        ticket: tuple[str, str] | None = None,
    ) -> None:
        cursor = self.cursor
        transition = b.Transition(
            proposal=proposal,
            decision=decision.stored(),
            exit=name,
            next=target,
            usage=self.usage,
            ticket_id=ticket[0] if ticket else None,
            args_hash=ticket[1] if ticket else None,
            continuation=ticket is not None,
            carried=cursor.carried(),
        )
        data = {**cursor.record.data, **proposal.update} if proposal.update else None
        before = cursor.position()
        cursor.enter(target, entries_in_commit=1)
        try:
            # The visit is over: the new state's transcript starts empty.
            await self.record(transition, data=data, consume=ticket, status="running", observe=False)
        except BaseException:
            cursor.restore(before)  # the journal did not move: neither does the run
            raise

    async def question(self, proposal: Question) -> None:
        decision = Decision(
            "ask",
            "runtime:question",
            ReasonCode.APPROVAL_REQUIRED,
            "the model asked a person",
            approver=self.state.escalate_to,
            expires_in=QUESTION_SECONDS,
        )
        args: dict[str, Any] = {"question": proposal.question}
        if proposal.fact is not None:
            declared = self.state.facts_from_answers
            if proposal.fact not in declared:
                listing = ", ".join(sorted(declared)) or "none"
                reason = (
                    f"fact {proposal.fact!r} cannot be set from an answer in state {self.state.name!r} "
                    f"(its facts_from_answers: {listing})"
                )
                raise Refusal(runtime_refusal("scope", ReasonCode.OUT_OF_SCOPE, reason))
            args["fact"] = proposal.fact
        await self.ask(proposal, decision, "question", args, value_hash(encode_json(args)), kind="question")

    async def handoff(self, proposal: Handoff) -> None:
        allowed = {*self.state.handoff_to, self.state.escalate_to}
        if proposal.to not in allowed:
            reason = f"handoff to {proposal.to!r} is not allowed (allowed: {', '.join(sorted(allowed))})"
            raise Refusal(runtime_refusal("scope", ReasonCode.OUT_OF_SCOPE, reason))
        decision = Decision("defer", "runtime:handoff", ReasonCode.DEFERRED, proposal.note, owner=proposal.to)
        await self.defer(proposal, decision, value_hash(encode_json(as_dict(proposal))))

    # -- outcomes that stop the step -------------------------------------------------------

    async def refused(self, proposal: Proposal | None, refusal: Refusal, *, raw: Any = None) -> None:
        """Record a refusal; the model sees why and may try something else."""
        refused = b.Refused(
            decision=refusal.decision.stored(),
            proposal=proposal,
            raw=recordable(raw, self.limits) if proposal is None else None,
            args_hash=refusal.args_hash,
            usage=self.usage,
        )
        if refusal.stop is None:
            return await self.record(refused)
        decision = refusal.decision
        await self.record(refused, self.stopped(refusal.stop, decision.reason_code, decision.reason))

    async def ask(
        self,
        proposal: Proposal,
        decision: Decision,
        subject: str,
        args: dict[str, Any],
        args_hash: str,
        kind: Literal["approval", "question"] = "approval",
    ) -> None:
        """Pause durably with a single-use ticket bound to the exact arguments."""
        cursor = self.cursor
        red = cursor.redactor  # the ticket and the paused step hold fingerprints, not values
        now = cursor.clock()
        open_for = min(decision.expires_in or QUESTION_SECONDS, self.state.max_ticket_seconds or math.inf)
        ticket = Ticket(
            ticket_id="tkt_" + secrets.token_hex(6),
            run_id=cursor.run_id,
            step_id=self.step_id,
            kind=kind,
            subject=subject,
            args=red.args(subject, args) if red is not None else args,
            args_hash=args_hash,
            approver=decision.approver or self.state.escalate_to,
            question=args.get("question") if kind == "question" else None,
            created_at=now,
            expires_at=now + open_for,
            approvals_required=decision.approvals or 1,
            forbid_self_approval=decision.forbid_self_approval,
        )
        cls = b.AwaitingAnswer if kind == "question" else b.AwaitingApproval
        awaiting = cls(
            proposal=proposal,
            decision=decision.stored(),
            ticket_id=ticket.ticket_id,
            args_hash=args_hash,
            usage=self.usage,
        )
        pending = as_dict(proposal) if red is None else red.proposal(as_dict(proposal))
        cursor.checkpoint.pending = Pending(self.step_id, ticket.ticket_id, pending, decision.checkpointed())
        await self.record(
            awaiting,
            status="paused",
            tickets=[ticket],
            owner=ticket.approver,
            reason_code=decision.reason_code,
            message=f"waiting on ticket {ticket.ticket_id} ({ticket.approver})",
        )

    async def defer(self, proposal: Proposal, decision: Decision, args_hash: str) -> None:
        """Hand the run to a named owner (or the agent state it is routed to), with a record
        of the work kept apart from the transcript (tether.handoffs)."""
        await handoffs.hand_off(self, proposal, decision, args_hash)

    async def stop(self, how: Stop, code: str, message: str) -> None:
        """Stop the run with nothing proposed (a budget spent before the model was asked, a
        model that failed)."""
        await self.record(self.stopped(how, code, message))

    def stopped(self, how: Stop, code: str, message: str) -> b.Escalated:
        cursor = self.cursor
        owner = self.state.escalate_to if how == "escalate" else None
        cls = b.Escalated if how == "escalate" else b.Failed
        return cls(
            reason_code=code, message=message, owner=owner, data=cursor.record.data, facts=cursor.record.facts
        )

    # -- the record ----------------------------------------------------------------------------

    async def record(
        self,
        *records: b.Body,
        consume: tuple[str, str] | None = None,
        durable: bool = False,
        status: str | None = None,
        data: dict[str, Any] | None = None,
        facts: dict[str, Any] | None = None,
        tickets: list[Ticket] | None = None,
        owner: str | None = None,
        reason_code: str | None = None,
        message: str | None = None,
        observe: bool = True,
    ) -> None:
        """The one stage that writes: the step's records and the run's checkpoint, in one
        transaction; then what the model and `history` see of them."""
        red = self.cursor.redactor
        if red is not None:  # sensitive fields are fingerprinted in whatever is written
            records = tuple(red.body(r) for r in records)
        if self.call_id is not None:
            for r in records:
                if isinstance(r, b.StepRecord):
                    r.call_id = self.call_id
        last = records[-1]
        if isinstance(last, b.Escalated):
            status = "failed" if isinstance(last, b.Failed) else "escalated"
            owner, reason_code, message = last.owner, last.reason_code, last.message
        entries: list[NewEntry] = [
            NewEntry.of(
                r,
                step_id=self.step_id if isinstance(r, b.StepRecord | b.UpstreamRestarted) else None,
                # A handoff an agent state received opens that state's visit.
                state=r.to_state if isinstance(r, b.HandoffReceived) and r.to_state else self.state.name,
            )
            for r in records
        ]
        await self.cursor.commit(
            entries,
            status=status,
            data=data,
            facts=facts,
            owner=owner,
            reason_code=reason_code,
            message=message,
            tickets=tickets,
            consume=consume,
            durable=durable,
        )
        for r, entry in zip(records, entries, strict=True):
            if observe:  # the entry as written: the transcript keeps its text, not a copy
                self.cursor.observe(r, self.step_id, entry)
            if self.span is NO_SPAN:
                continue
            decision: Decision | None = (
                getattr(r, "decision", None) if "decision" in r.__struct_fields__ else None
            )
            if decision is not None:
                self.span.set(
                    {
                        "tether.entry": b.KIND_OF.get(type(r), type(r).__name__),
                        "tether.decision": decision.decision,
                        "tether.rule_id": decision.rule_id,
                        "tether.reason_code": str(decision.reason_code),
                    }
                )

    # -- continuations ---------------------------------------------------------------------------

    async def resume_ticket(self, ticket: Ticket, pending: Pending) -> None:
        """Continue the step a person decided: answer, refusal, or the approved call."""
        cursor = self.cursor
        cursor.checkpoint.pending = None
        cursor.record.status = "running"
        cursor.clear_notice()
        if ticket.kind == "question":
            answered = ticket.status == "answered"
            cls = b.Answered if answered else b.Unanswered
            values: dict[str, Any] = {"ticket_id": ticket.ticket_id, "answer": ticket.answer}
            values["by"], values["reason"] = ticket.decided_by, ticket.reason
            if not answered:
                values["reason_code"] = ReasonCode.APPROVAL_DENIED
            fact = pending.proposal.get("fact") if answered and ticket.answer is not None else None
            if fact is None:
                return await self.record(cls(**values), status="running")
            # What the person said is now a fact, its source this entry (and `provenance()`).
            facts = {**cursor.record.facts, fact: ticket.answer}
            return await self.record(cls(**values, fact=fact), status="running", facts=facts)
        proposal = msgspec.convert(pending.proposal, Proposal)
        role = pending.decision.escalate_on_expiry
        if ticket.status == "expired" and role:  # the rule's `on_expiry: {escalate: ROLE}`
            message = expired_message(ticket, role)
            expired = b.TicketExpiredRecord(
                ticket_id=ticket.ticket_id,
                on_expiry="escalate",
                escalated_to=role,
                expired_at=ticket.expires_at,
            )
            data, facts = cursor.record.data, cursor.record.facts
            escalated = b.Escalated(
                reason_code=ReasonCode.APPROVAL_EXPIRED, message=message, owner=role, data=data, facts=facts
            )
            return await self.record(expired, escalated, observe=False)
        if ticket.status != "approved":
            code = ReasonCode.APPROVAL_EXPIRED if ticket.status == "expired" else ReasonCode.APPROVAL_DENIED
            reason = ticket.reason or f"ticket {ticket.ticket_id} {ticket.status}"
            denial = Decision(
                "deny", f"approval:{ticket.ticket_id}", code, f"{reason} (by {ticket.decided_by or 'nobody'})"
            )
            refused = b.Refused(
                decision=denial, proposal=proposal, args_hash=ticket.args_hash, continuation=True
            )
            return await self.record(refused, status="running")
        decision = pending.decision
        try:
            if isinstance(proposal, ToolCall):
                # The workflow may have been migrated since: the call must still be offered.
                tool = self.scope(proposal.tool)
                # An approver who edited the call approved exactly the edited arguments (the
                # ticket is bound to them): those are what run, once.
                edited = ticket.original_args_hash is not None
                args = self.arguments(tool, self._unsealed(ticket.args if edited else proposal.args))
                await self.execute(tool, args, decision, proposed=proposal.args, ticket_id=ticket.ticket_id)
                return
            assert isinstance(proposal, Exit | Finish)
            name = proposal.exit if isinstance(proposal, Exit) else "finish"
            target = self.state.exits[name]
            await self.take_exit(
                proposal, decision, name, target, ticket=(ticket.ticket_id, ticket.args_hash)
            )
        except Refusal as refusal:
            await self._unusable(proposal, ticket, refusal.decision.reason_code, refusal.decision.reason)
        except TicketExpired as exc:  # approved in time, used too late (by the store's clock)
            await self.cursor.journal.expire_ticket(ticket.ticket_id)
            await self._unusable(proposal, ticket, ReasonCode.APPROVAL_EXPIRED, str(exc))
        except TicketError as exc:  # the store refused the ticket for these arguments
            await self._unusable(proposal, ticket, ReasonCode.APPROVAL_DENIED, str(exc))

    def _unsealed(self, args: dict[str, Any]) -> dict[str, Any]:
        """Arguments recorded with fingerprints in place of sensitive values, with the values
        this process still holds (tether.sensitive); a Refusal when it holds none of them: the
        value was never recorded, so the approved call cannot be carried out here."""
        restored, missing = sensitive.restore(args)
        if missing:
            reason = (
                "the call has sensitive argument(s) whose values are not recorded and not held by "
                "this process (it was resumed elsewhere or restarted): propose the call again"
            )
            raise Refusal(runtime_refusal("arguments", ReasonCode.SENSITIVE_VALUE_UNAVAILABLE, reason))
        result: dict[str, Any] = restored
        return result

    async def _unusable(self, proposal: Proposal, ticket: Ticket, code: ReasonCode, reason: str) -> None:
        """An approved call that can no longer be carried out is refused, on the record."""
        denial = Decision("deny", f"approval:{ticket.ticket_id}", code, reason)
        refused = b.Refused(decision=denial, proposal=proposal, args_hash=ticket.args_hash, continuation=True)
        await self.record(refused, status="running")

    async def recover(self, intent: Entry) -> None:
        """An intent with no result: the process died while the effect was under way."""
        record = intent.body
        assert isinstance(record, b.Intent)
        cursor = self.cursor
        tool = self.state.tool(record.tool)
        fields: dict[str, Any] = {
            f: getattr(record, f)
            for f in ("tool", "args", "decision", "args_hash", "proposed_args", "ticket_id", "usage")
        }
        fields["continuation"] = record.continuation
        # A fingerprint is not the value: a call with a sensitive argument that this process
        # does not hold cannot be repeated, idempotent or not.
        unsealed, missing = sensitive.restore(record.args)
        if tool is not None and tool.idempotent and not missing:
            cursor.record.status = "running"
            cursor.clear_notice()
            args = tool.validate(unsealed)
            return await self.run_tool(tool, args, fields | {"recovered": True})
        why = "its sensitive arguments are not recorded" if missing else "not idempotent"
        message = (
            f"step {intent.step_id}: {record.tool} ({why}) was started but its result was "
            "never recorded; it will not be re-run without a person: check, then "
            f"tether resolve {cursor.run_id} --done | --not-done"
        )
        await self.record(
            b.EffectInDoubt(**fields, message=message),
            status="effect_in_doubt",
            owner=self.state.escalate_to,
            reason_code=ReasonCode.EFFECT_IN_DOUBT,
            message=message,
        )


def _model_attributes(model: Model, step_id: str) -> dict[str, str]:
    """GenAI semantic conventions for a model call: `provider:model` names give both."""
    provider, _, name = model.name.rpartition(":")
    attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": name, "tether.step_id": step_id}
    return attributes | ({"gen_ai.provider.name": provider} if provider else {})


def _restarted(ctx: ToolContext) -> list[b.UpstreamRestarted]:
    """The restarts of the servers a tool calls that its call found, as entries."""
    return [b.UpstreamRestarted(upstream=str(r[0]), restart=int(r[1]), at=float(r[2])) for r in ctx.restarts]


def recordable(value: Any, lim: limits.Limits, max_bytes: int | None = None) -> Any:
    """`value` as the journal can hold it: as it is when it is a JSON value within the limits,
    else a note saying what was received (never a silent rewrite)."""
    if value is None:
        return None
    bound = max_bytes or lim.max_output_bytes
    problem = json_value_problem(value, lim.output()) if not isinstance(value, str) else None
    if problem is None:
        text = value if isinstance(value, str) else None
        size = len(text) if text is not None else len(encode_json(value))
        if size <= bound:
            return value
        problem = f"{size:,} bytes exceeds the limit of {bound:,}"
    preview = value[:1000] if isinstance(value, str) else _preview.repr(value)
    return {"not_recorded": problem, "type": type(value).__name__, "preview": preview}


def _bounded_repr() -> reprlib.Repr:
    """A repr for values that cannot be recorded (deeply nested, say): never recurses far."""
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlist, r.maxdict = 4, 200, 200, 20, 20
    return r


_preview = _bounded_repr()
