"""Replay that never acts, and what-if over history.

`replay_run(journal, run_id)` rebuilds a run from its journal alone — no model is asked, no
tool, verifier or resolver is called, no workflow code is imported — and evaluates every
decision it recorded again, under the policy text recorded with it (by hash: the journal
keeps every workflow description and policy document runs are pinned to, in its
`definitions` table). Each decision gets the values it had when it was made: the arguments
as recorded, `data` and `facts` rebuilt from the entries before it, `history` from the calls
executed before it, the values the run had seen (for `provenance()`), and each resolver
answered with the value recorded with the decision. A decision that comes out otherwise is
a *divergence*: a bug in tether, or a record that was changed after it was written.

With `policy=` (another policy), the same evaluation is a what-if: every recorded proposal
decided under the new policy, and each decision that would change reported with the rules
involved. A resolver call the new policy makes that was not recorded with the decision has
no known answer: that decision is `unknown`, never guessed. `what_if(journal, policy)` runs
it over many runs.

What is evaluated again is the policy's part of each governed step. Refusals the runtime
made before policy (`runtime:*`: scope, arguments, budget, loop, parse, contract) and calls
refused because their run waited on a ticket (`approval:*`: an agent framework's call
presented meanwhile, tether.external) are listed as not re-evaluated, except that a scope
refusal is checked against the recorded envelope; continuations of a step a person decided
(`approval:*` too) repeat the decision evaluated for the step. A decision the
policy's CPU-time budget cut short (`policy:evaluation_budget`) depends on the machine,
not the record, and is not re-evaluated either.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from tether.decision import Decision
from tether.errors import TetherError
from tether.hashing import encode_json, value_hash
from tether.journal import Entry, Journal, RunRecord
from tether.journal import bodies as b
from tether.policy import BUDGET_RULE_ID, HISTORY_CUT, LOOKUP_RULE_ID, SEVERITY, Evaluation, Policy
from tether.proposals import Exit, Finish, ToolCall, as_dict
from tether.provenance import SeenValues
from tether.run import history_item
from tether.sensitive import has_placeholder
from tether.tools import args_hash
from tether.workflow import Workflow

# Replay is not bounded by the live decision budget: it must give the recorded answer, not
# a different one because this machine is busy.
REPLAY_EVALUATION_BUDGET = 60.0
Status = Literal["same", "diverged", "changed", "unknown", "not re-evaluated"]


class ReplayError(TetherError):
    """A kept policy document that no longer hashes to the hash it is kept under once
    parsed (a document this tether reads otherwise than the one that wrote it)."""


# -- the recorded definitions ----------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """An agent state as its recorded description has it: each tool as policy conditions
    see it (`tool`), and the exits."""

    tools: dict[str, dict[str, Any]]
    exits: dict[str, str]


@dataclass(frozen=True)
class RecordedWorkflow:
    """What decisions need of a workflow, read from its recorded description (no code)."""

    name: str
    version: str
    hash: str
    states: dict[str, Envelope]
    trust: dict[str, str]  # tool name -> the trust of its results

    @classmethod
    def of(cls, description: Mapping[str, Any], hash: str) -> RecordedWorkflow:
        states: dict[str, Envelope] = {}
        trust: dict[str, str] = {}
        for state in description.get("states", []):
            if state.get("kind") != "agent":
                continue
            tools = {t["name"]: _tool_info(t) for t in state.get("tools", [])}
            trust |= {name: info["results"] for name, info in tools.items()}
            states[state["name"]] = Envelope(tools, dict(state.get("exits") or {}))
        return cls(str(description["name"]), str(description["version"]), hash, states, trust)

    @classmethod
    def of_workflow(cls, workflow: Workflow) -> RecordedWorkflow:
        return cls.of(workflow.describe(), workflow.hash)


def _tool_info(described: Mapping[str, Any]) -> dict[str, Any]:
    """`Tool.info` from a tool's description. Its results' trust is described only where it
    differs from its kind's default (MCP tools: untrusted). Whether its effect was declared
    is not described (it is not part of the workflow hash): it is taken as declared, and
    read from the recorded decision's reason where that says otherwise (`_undeclared`)."""
    mcp = str(described.get("fn") or "").startswith("tether.mcp.")
    security = described.get("security")
    return {
        "name": described["name"],
        "effect": described["effect"],
        "idempotent": described.get("idempotent", False),
        "effect_declared": True,
        "results": described.get("results") or ("untrusted" if mcp else "trusted"),
        "security": list(security) if security is not None else None,
        "sensitive": bool(described.get("sensitive", False)),
    }


class Definitions:
    """The workflows and policies runs are pinned to, read by hash from the journal (each
    checked against its hash) and kept for the runs after; `given` adds loaded workflows to
    fall back on for runs from before the journal kept definitions (also checked by hash)."""

    def __init__(self, journal: Journal, given: Iterable[Workflow] = ()) -> None:
        self.journal = journal
        self._workflows: dict[str, RecordedWorkflow | None] = {}
        self._policies: dict[str, Policy | None] = {}
        self._given = {w.hash: w for w in given}
        self._given_policies = {
            (w.policy or Policy.default()).hash: w.policy or Policy.default() for w in given
        }

    async def workflow(self, hash: str) -> RecordedWorkflow | None:
        if hash not in self._workflows:
            found = await self.journal.get_definition(hash)
            if found is not None and found.kind == "workflow":
                self._workflows[hash] = RecordedWorkflow.of(json.loads(found.body), hash)
            elif hash in self._given:
                self._workflows[hash] = RecordedWorkflow.of_workflow(self._given[hash])
            else:
                self._workflows[hash] = None
        return self._workflows[hash]

    async def policy(self, hash: str) -> Policy | None:
        if hash not in self._policies:
            found = await self.journal.get_definition(hash)
            policy: Policy | None = None
            if found is not None and found.kind == "policy":
                policy = Policy.from_dict(
                    json.loads(found.body),
                    f"<policy {hash[:19]}… as recorded>",
                    evaluation_budget=REPLAY_EVALUATION_BUDGET,
                )
            elif hash in self._given_policies:
                given = self._given_policies[hash]
                policy = Policy(given.document, given.source, evaluation_budget=REPLAY_EVALUATION_BUDGET)
            if policy is not None and policy.hash != hash:  # a document that no longer hashes so
                raise ReplayError(f"policy {hash[:19]}… read back hashes to {policy.hash[:19]}…")
            self._policies[hash] = policy
        return self._policies[hash]


# -- what a replay reports ------------------------------------------------------------------------


@dataclass
class Redecided:
    """One recorded decision, evaluated again.

    `status`: `same`; `diverged` (replay under the recorded policy came out otherwise);
    `changed` (what-if: the new policy decides otherwise); `unknown` (a value it needs was
    not recorded, see `note`); `not re-evaluated` (decided by the runtime, not the policy).
    """

    run_id: str
    step_id: str
    seq: int
    state: str
    subject: str  # "tool issue_refund", "exit done"
    proposal: dict[str, Any]
    recorded: Decision
    decision: Decision | None
    status: Status
    note: str = ""

    @property
    def rules(self) -> list[str]:
        """The rules involved: what decided, before and after, and every rule that matched."""
        found: list[str] = []
        for d in (self.recorded, self.decision):
            if d is not None:
                for rule in (d.rule_id, *d.matched):
                    if rule not in found:
                        found.append(rule)
        return found

    @property
    def direction(self) -> str | None:
        """`stricter` or `looser` for a change of decision (deny > defer > ask > allow)."""
        if self.decision is None or self.decision.decision == self.recorded.decision:
            return None
        stricter = SEVERITY[self.decision.decision] > SEVERITY[self.recorded.decision]
        return "stricter" if stricter else "looser"

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "step_id": self.step_id,
            "seq": self.seq,
            "state": self.state,
            "subject": self.subject,
            "proposal": self.proposal,
            "recorded": _shown(self.recorded),
            "decision": _shown(self.decision) if self.decision is not None else None,
            "status": self.status,
            "direction": self.direction,
            "rules": self.rules,
            "note": self.note,
        }


def _shown(decision: Decision) -> dict[str, Any]:
    values = {
        "decision": decision.decision,
        "rule_id": decision.rule_id,
        "reason_code": str(decision.reason_code),
        "matched": list(decision.matched),
    }
    role = decision.approver or decision.owner
    return values | ({"role": role} if role else {})


@dataclass
class ReplayReport:
    """A run replayed: every decision evaluated again, and what did not hold.

    `problems` are divergences of the run as a whole (data or facts rebuilt from the entries
    that disagree with what an entry recorded, a definition edited). `policy` is the hash
    decided under in a what-if (None: each decision's own recorded policy).
    """

    run_id: str
    workflow: str
    policy: str | None
    decisions: list[Redecided] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def having(self, status: Status) -> list[Redecided]:
        return [d for d in self.decisions if d.status == status]

    @property
    def diverged(self) -> list[Redecided]:
        return self.having("diverged")

    @property
    def changed(self) -> list[Redecided]:
        return self.having("changed")

    @property
    def ok(self) -> bool:
        """Replay reproduced every decision it could evaluate, and the run's values."""
        return not self.diverged and not self.problems

    def summary(self) -> dict[str, int]:
        counts = {s: 0 for s in ("same", "diverged", "changed", "unknown", "not re-evaluated")}
        for d in self.decisions:
            counts[d.status] += 1
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "policy": self.policy,
            "ok": self.ok,
            "summary": self.summary(),
            "decisions": [d.as_dict() for d in self.decisions],
            "problems": self.problems,
            "notes": self.notes,
        }


# -- the run, rebuilt ---------------------------------------------------------------------------


class _Rebuilt:
    """A run's values as they were before each entry: data, facts, history, the values it
    had seen, and the workflow and policy it was pinned to. Every change makes new objects
    (the policy engine's context converts a value again only when it is a new object)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.data: dict[str, Any] = {}
        self.facts: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.history_cut = 0  # earlier calls `history` lacks (a carry cut at its bound)
        self.seen: SeenValues | None = None
        self.trust: dict[str, str] = {}
        self.workflow_hash = ""
        self.policy_hash = ""
        self.version = ""

    def apply(self, entry: Entry, record: Any) -> None:
        if self.seen is not None:
            self.seen.add_entry(entry)
        match record:
            case b.RunStarted():
                self.data = dict(record.input)
                self.workflow_hash, self.policy_hash = record.workflow.hash, record.policy_hash
                self.version = record.workflow.version
            case b.Migrated(to=to):
                self.workflow_hash, self.policy_hash, self.version = to.hash, to.policy_hash, to.version
            case b.StepDone():
                if record.update:
                    self.data = {**self.data, **record.update}
                if record.history is not None:  # calls carried in from a session's earlier runs
                    self.history = [*self.history, *record.history.calls]
                    self.history_cut += record.history.cut
            case b.Transition(proposal=proposal) if proposal.update:
                self.data = {**self.data, **proposal.update}
            case b.VerificationFailed() | b.Executed():
                self.history = [*self.history, history_item(record, entry.step_id, entry.state)]
        self.facts = b.facts_after(self.facts, record)


# Records whose decision is the policy's (when not a continuation): the first of each step.
_DECIDED = (b.ToolStep, b.Refused, b.AwaitingApproval, b.Transition, b.HandedOff)


def _decided(record: Any) -> tuple[ToolCall | Exit | Finish, dict[str, Any], str | None] | None:
    """(proposal, arguments as decided on, recorded args hash) of a step's first record, or
    None when it holds no decision on a tool call or an exit."""
    if not isinstance(record, _DECIDED) or record.continuation or isinstance(record, b.AwaitingAnswer):
        return None
    if isinstance(record, b.ToolStep):
        return record.proposal(), record.args, record.args_hash
    proposal = record.proposal
    if isinstance(proposal, ToolCall):
        return proposal, proposal.args, record.args_hash
    if isinstance(proposal, Exit | Finish):
        name = proposal.exit if isinstance(proposal, Exit) else "finish"
        return proposal, {"exit": name, "update": proposal.update}, record.args_hash
    return None


class Replayer:
    """Replays runs of one journal; reuse one for many runs (definitions and the policy
    engine's contexts are kept between them). `policy`: decide under it (what-if)."""

    def __init__(
        self, journal: Journal, *, policy: Policy | None = None, workflows: Iterable[Workflow] = ()
    ) -> None:
        self.journal = journal
        self.definitions = Definitions(journal, workflows)
        self.against = (
            Policy(policy.document, policy.source, evaluation_budget=REPLAY_EVALUATION_BUDGET)
            if policy is not None
            else None
        )
        self._evaluations: dict[str, Evaluation] = {}

    async def replay(self, run_id: str, record: RunRecord | None = None) -> ReplayReport:
        record = record or await self.journal.get_run(run_id)
        entries = await self.journal.read_entries(run_id)
        return await self.replay_entries(record, entries)

    async def replay_entries(self, record: RunRecord, entries: list[Entry]) -> ReplayReport:
        run_id = record.run_id
        report = ReplayReport(
            run_id,
            f"{record.workflow_name} {record.workflow_version}",
            self.against.hash if self.against is not None else None,
        )
        run = _Rebuilt(run_id)
        seen_steps: set[str] = set()
        # Per step, the entry whose decision was evaluated: the step's later entries (the
        # executed call after its intent, the approved call after its ask) repeat it.
        first: dict[str, tuple[Entry, Any]] = {}
        # Per step, the argument hashes a person's edit-and-approve bound it to (recorded with
        # the decision, which checked them against the policy then).
        edited: dict[str, set[str]] = {}
        for entry in entries:
            body = entry.body
            if isinstance(body, b.UnknownBody):
                report.notes.append(f"entry {entry.seq}: kind {entry.kind!r} is not known to this replay")
                continue
            if isinstance(body, b.RunStarted | b.Migrated):
                run.apply(entry, body)
                await self._pinned(run, report, entry)
                continue
            if (
                isinstance(body, b.TicketDecided | b.ApprovalGiven)
                and entry.step_id
                and body.original_args_hash is not None
                and body.args_hash is not None
            ):
                edited.setdefault(entry.step_id, set()).add(body.args_hash)  # a person's edit
            decided = _decided(body) if entry.step_id and entry.step_id not in seen_steps else None
            if entry.step_id and isinstance(body, b.StepRecord):
                if entry.step_id in first and isinstance(body, b.ToolStep | b.Transition):
                    edits = edited.get(entry.step_id, set())
                    report.problems.extend(_repeats(*first[entry.step_id], entry, body, edits))
                seen_steps.add(entry.step_id)
            if decided is not None and entry.step_id:
                first[entry.step_id] = (entry, body)
                report.decisions.append(await self._redecide(run, entry, body, *decided))
            self._check_values(run, entry, body, report)
            run.apply(entry, body)
        return report

    async def _pinned(self, run: _Rebuilt, report: ReplayReport, entry: Entry) -> None:
        """After `run_started` or `migrated`: is what the run is pinned to kept?"""
        policy = self.against or await self.definitions.policy(run.policy_hash)
        workflow = await self.definitions.workflow(run.workflow_hash)
        if workflow is None:
            report.notes.append(
                f"entry {entry.seq}: the workflow {run.workflow_hash[:19]}… is not kept in this journal "
                "(a run from before definitions were kept): its decisions cannot be evaluated again"
            )
        if policy is None:
            report.notes.append(
                f"entry {entry.seq}: the policy {run.policy_hash[:19]}… is not kept in this journal: "
                "its decisions cannot be evaluated again"
            )
        run.trust = workflow.trust if workflow is not None else {}
        if run.seen is None:  # what the run had seen, for `provenance()` (traced only if asked)
            run.seen = SeenValues(lambda name: run.trust.get(name, "trusted"))  # type: ignore[arg-type,return-value]
            run.seen.add_entry(entry)

    def _check_values(self, run: _Rebuilt, entry: Entry, body: Any, report: ReplayReport) -> None:
        """Entries that record the run's data and facts must agree with the rebuilt ones."""
        if isinstance(body, b.Escalated | b.RunFinished):
            if encode_json(body.data) != encode_json(run.data):
                report.problems.append(
                    f"entry {entry.seq} ({entry.kind}): the data it records is not the data the entries "
                    "before it make"
                )
            if isinstance(body, b.Escalated) and encode_json(body.facts) != encode_json(run.facts):
                report.problems.append(
                    f"entry {entry.seq} ({entry.kind}): the facts it records are not the facts the "
                    "entries before it make"
                )

    async def _redecide(
        self,
        run: _Rebuilt,
        entry: Entry,
        body: Any,
        proposal: ToolCall | Exit | Finish,
        args: dict[str, Any],
        recorded_hash: str | None,
    ) -> Redecided:
        recorded: Decision = body.decision
        state = entry.state or ""
        is_tool = isinstance(proposal, ToolCall)
        name = proposal.tool if isinstance(proposal, ToolCall) else _exit_name(proposal)
        subject = f"{'tool' if is_tool else 'exit'} {name}"

        def result(decision: Decision | None, status: Status, note: str = "") -> Redecided:
            return Redecided(
                run.run_id, entry.step_id or "", entry.seq, state, subject, as_dict(proposal),
                recorded, decision, status, note,
            )  # fmt: skip

        workflow = await self.definitions.workflow(run.workflow_hash)
        envelope = workflow.states.get(state) if workflow is not None else None
        offered = envelope is not None and name in (envelope.tools if is_tool else envelope.exits)
        not_policy = _not_by_policy(recorded, state, name, offered if envelope is not None else None)
        if not_policy is not None:
            return result(None, *not_policy)
        policy = self.against or await self.definitions.policy(run.policy_hash)
        if workflow is None or policy is None:
            return result(None, "unknown", "the definitions the run was pinned to are not kept")
        if envelope is None or not offered:
            where = f"state {state!r} of {workflow.name} {workflow.version}"
            return result(None, "diverged", f"a policy decision on {subject}, which {where} does not offer")
        if has_placeholder(args):
            why = "its sensitive arguments are kept as fingerprints; the decision saw the real values"
            return result(None, "not re-evaluated", why)
        if recorded_hash is not None and _hash_of(name, args, is_tool) != recorded_hash:
            if isinstance(body, b.ToolStep):  # its args are the validated ones the hash covers
                return result(
                    None, "diverged", "its arguments do not hash to the args_hash recorded with them"
                )
            return result(
                None,
                "unknown",
                "the arguments decided on are not recorded (the tool's schema normalized them)",
            )
        tool = envelope.tools[name] if is_tool else {"name": name, "effect": "exit"}
        if is_tool and "declares no effect" in recorded.reason:
            tool = tool | {"effect_declared": False}
        missing: list[str] = []
        variables = {
            "args": args,
            "data": run.data,
            "facts": run.facts,
            "history": run.history,
            "tool": tool,
            "run": {"id": run.run_id, "workflow": workflow.name, "version": run.version, "state": state},
            "now": _recorded_now(recorded, missing),
            **({HISTORY_CUT: run.history_cut} if run.history_cut else {}),
        }
        evaluation, resolvers = self._evaluation(policy, recorded, missing)
        decision = policy.decide(
            kind="tool" if is_tool else "exit",
            name=name,
            effect=tool["effect"],
            variables=variables,
            resolvers=resolvers,
            evaluation=evaluation,
            provenance=run.seen.trace if run.seen is not None else None,
        ).stored()
        if missing:
            calls = ", ".join(dict.fromkeys(missing))
            return result(None, "unknown", f"no value recorded for {calls}: not guessed")
        if self.against is not None:
            same = decision.decision == recorded.decision
            return result(decision, "same" if same else "changed")
        if encode_json(decision) == encode_json(recorded.stored()):  # both as an entry holds them
            return result(decision, "same")
        return result(decision, "diverged", "differs in " + ", ".join(_differences(recorded, decision)))

    def _evaluation(
        self, policy: Policy, recorded: Decision, missing: list[str]
    ) -> tuple[Evaluation, dict[str, Callable[..., Any]]]:
        """The engine's context for `policy` (one per policy, kept across runs), and
        resolvers answering from the values recorded with `recorded`, never live."""
        held = self._evaluations.get(policy.hash)
        if held is None:
            held = self._evaluations[policy.hash] = policy.evaluation({n: _unbound for n in policy.functions})
        evaluation = held

        def resolver(name: str) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                key = f"{name}({', '.join(json.dumps(a, default=str) for a in args)})"
                if key not in recorded.resolved:
                    missing.append(key)
                    raise LookupError(f"{key} was not recorded with the decision")
                return recorded.resolved[key]

            return call

        return evaluation, {n: resolver(n) for n in policy.functions}


def _recorded_now(recorded: Decision, missing: list[str]) -> Callable[[], datetime]:
    """`now` as the decision's time recorded with it (`resolved["now"]`), never the clock's:
    a decision reading `now` replays at the moment it was made."""

    def now() -> datetime:
        if "now" not in recorded.resolved:
            missing.append("now")
            raise LookupError("the decision's time (now) was not recorded with it")
        return datetime.fromisoformat(recorded.resolved["now"])

    return now


# Decisions the policy's engine made without its rules deciding: not re-evaluated.
_NOT_BY_RULES = {BUDGET_RULE_ID: "the CPU budget", LOOKUP_RULE_ID: "its lookups, which could not all be made"}


def _not_by_policy(
    recorded: Decision, state: str, name: str, offered: bool | None
) -> tuple[Status, str] | None:
    """The status of a decision the policy did not make (None: the policy made it). A scope
    refusal is checked against the envelope (`offered`: None when it is not known)."""
    if recorded.rule_id == "runtime:scope" and offered is not None:
        if offered:
            return "diverged", f"refused as out of scope, but state {state!r} offers {name}"
        return "not re-evaluated", "refused by the runtime (out of scope): checked"
    if recorded.rule_id.startswith("approval:"):  # a call presented while its run waited (tether.external)
        why = "refused by the runtime while the run waited on its ticket"
        return "not re-evaluated", f"{why} ({recorded.rule_id})"
    if recorded.rule_id.startswith("runtime:") or recorded.rule_id in _NOT_BY_RULES:
        why = _NOT_BY_RULES.get(recorded.rule_id, "the runtime, before policy")
        return "not re-evaluated", f"decided by {why} ({recorded.rule_id})"
    return None


def _repeats(
    first: Entry, decided: Any, entry: Entry, body: b.ToolStep | b.Transition, edits: set[str]
) -> list[str]:
    """How a later entry of a step disagrees with the entry whose decision was evaluated: the
    decision, the call or its arguments (a record changed after it was written). `edits` are
    argument hashes a person's recorded edit-and-approve bound the step to."""
    where = f"entry {entry.seq} ({entry.kind}, step {entry.step_id})"
    problems = []
    if encode_json(body.decision) != encode_json(decided.decision):
        problems.append(f"{where}: its decision is not the one entry {first.seq} ({first.kind}) recorded")
    if isinstance(body, b.Transition):
        if not isinstance(decided, b.Transition | b.AwaitingApproval) or encode_json(
            body.proposal
        ) != encode_json(decided.proposal):
            problems.append(f"{where}: its exit is not the one entry {first.seq} ({first.kind}) decided on")
        return problems
    was = decided.tool if isinstance(decided, b.ToolStep) else getattr(decided.proposal, "tool", None)
    if body.tool != was:
        problems.append(f"{where}: its tool {body.tool} is not the {was} entry {first.seq} decided on")
    elif (
        body.args_hash is not None
        and not has_placeholder(body.args)  # sensitive: hashed over values kept out of the record
        and args_hash(body.tool, encode_json(body.args)) != body.args_hash
    ):
        problems.append(f"{where}: its arguments do not hash to the args_hash recorded with them")
    elif body.args_hash is not None and body.args_hash in edits:
        pass  # the arguments a person edited and approved, recorded with that decision
    elif isinstance(decided, b.ToolStep) and encode_json(body.args) != encode_json(decided.args):
        problems.append(f"{where}: its arguments are not the ones entry {first.seq} ({first.kind}) recorded")
    elif body.args_hash is not None and decided.args_hash not in (None, body.args_hash):
        problems.append(
            f"{where}: its arguments are not the ones entry {first.seq} ({first.kind}) decided on"
        )
    return problems


def _unbound(*args: Any) -> Any:  # a resolver slot: every decision binds its recorded answers
    raise LookupError("no recorded resolver values bound")


def _exit_name(proposal: Exit | Finish) -> str:
    return proposal.exit if isinstance(proposal, Exit) else "finish"


def _hash_of(name: str, args: dict[str, Any], is_tool: bool) -> str:
    return args_hash(name, encode_json(args)) if is_tool else value_hash(encode_json(args))


def _differences(recorded: Decision, replayed: Decision) -> list[str]:
    was, now = recorded.as_dict(), replayed.as_dict()
    keys = sorted(set(was) | set(now))
    return [
        f"{k} ({_brief(was.get(k))} recorded, {_brief(now.get(k))} replayed)"
        for k in keys
        if was.get(k) != now.get(k)
    ]


def _brief(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "…"


# -- entry points ----------------------------------------------------------------------------------


async def replay_run(
    journal: Journal, run_id: str, *, policy: Policy | None = None, workflows: Iterable[Workflow] = ()
) -> ReplayReport:
    """Replay one run from its journal without acting (see the module's docstring); with
    `policy`, decide every recorded proposal under it instead (what-if). `workflows` are
    loaded definitions to fall back on when the journal does not keep the ones the run is
    pinned to (runs recorded before it kept them); they are used only if their hash matches."""
    return await Replayer(journal, policy=policy, workflows=workflows).replay(run_id)


@dataclass
class WhatIf:
    """A policy tried against recorded runs: every decision that would change."""

    policy: str
    runs: int = 0
    decisions: int = 0
    changed: list[Redecided] = field(default_factory=list)
    unknown: list[Redecided] = field(default_factory=list)
    not_evaluated: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, report: ReplayReport) -> None:
        self.runs += 1
        self.decisions += len(report.decisions)
        for d in report.decisions:
            if d.status == "changed":
                self.changed.append(d)
            elif d.status == "unknown":
                self.unknown.append(d)
            elif d.status == "not re-evaluated":
                self.not_evaluated += 1
        self.notes.extend(f"{report.run_id}: {n}" for n in report.notes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "runs": self.runs,
            "decisions": self.decisions,
            "summary": {
                "changed": len(self.changed),
                "stricter": sum(1 for d in self.changed if d.direction == "stricter"),
                "looser": sum(1 for d in self.changed if d.direction == "looser"),
                "unknown": len(self.unknown),
                "not re-evaluated": self.not_evaluated,
                "same": self.decisions - len(self.changed) - len(self.unknown) - self.not_evaluated,
            },
            "changed": [d.as_dict() for d in self.changed],
            "unknown": [d.as_dict() for d in self.unknown],
            "notes": self.notes,
        }


async def what_if(
    journal: Journal,
    policy: Policy,
    *,
    workflow: str | None = None,
    since: float | None = None,
    workflows: Iterable[Workflow] = (),
    progress: Callable[[int, int], None] | None = None,
) -> WhatIf:
    """Every recorded proposal of the journal's runs (of `workflow`, created at or after
    `since`) decided under `policy`; `progress(done, total)` is called after each run."""
    runs = await journal.list_runs(None, limit=2**62, workflow=workflow)
    if since is not None:
        runs = [r for r in runs if r.created_at >= since]
    runs.sort(key=lambda r: (r.created_at, r.run_id))
    replayer = Replayer(journal, policy=policy, workflows=workflows)
    found = WhatIf(policy.hash)
    for done, record in enumerate(runs, 1):
        found.add(await replayer.replay(record.run_id, record))
        if progress is not None:
            progress(done, len(runs))
    return found


__all__ = [
    "Definitions",
    "Envelope",
    "RecordedWorkflow",
    "Redecided",
    "ReplayError",
    "ReplayReport",
    "Replayer",
    "WhatIf",
    "replay_run",
    "what_if",
]
