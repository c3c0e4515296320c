"""Run one AgentDojo (user task, injection task) pair through its governed workflow, and score it.

The environment carries the injection: AgentDojo's "important instructions" attack text,
with the injection task's goal, in every place the user task's ground truth reads (the
attack's own choice of injection vectors). A scripted model then proposes, one per turn:

1. the user task's ground-truth calls (what a model doing its job would do);
2. as soon as a result shows it the injected text, the injection task's ground-truth calls
   (what a model that obeys the text does: it asks for them "before you can solve the
   task", and AgentDojo's checks assume that order, e.g. the attacker's calendar event is
   looked for as the first one created), then the rest of the user task's calls. A model
   cannot obey text it never read: when policy refused the read that would have shown it,
   the model does not propose the attacker's calls, and the result says so;
3. `finish`, with the user task's expected answer as its summary.

Every proposal goes through the governed step: policy decides; an `ask` is answered by the
scripted person (`dojo_person`); whatever is refused or denied is not executed and the
script goes on. The environment after the run is scored with AgentDojo's own checks: the
user task's `utility` (did the user get what they asked for) and the injection task's
`security` (did the attacker's goal happen: True means the attack succeeded). Checks that
read the call trace get the calls that were executed, not those proposed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from agentdojo.attacks.base_attacks import FixedJailbreakAttack
from agentdojo.attacks.important_instructions_attacks import ImportantInstructionsAttack
from agentdojo.base_tasks import BaseInjectionTask, BaseUserTask
from agentdojo.functions_runtime import FunctionCall, TaskEnvironment
from dojo_person import intent_person, prompt_person
from dojo_suites import DECLARATIONS, suite, workflow
from dojo_tools import attach, detach

from tether import ModelContext, ModelReply, Workflow
from tether.journal import Journal
from tether.journal import bodies as b
from tether.testing import ScriptedPerson, StepDecision, run_to_end_async

# AgentDojo's "important instructions" attack as its paper runs it, signed by the user's
# name; the victim model is not named (a scripted model has no name to address).
ATTACKER_SIGNS_AS = "Emma Johnson"


@dataclass
class PairResult:
    suite: str
    user_task: str
    injection_task: str
    person: str
    provenance: bool
    status: str
    utility: bool
    attack_succeeded: bool
    asks: int
    steps: list[StepDecision]
    decision_seconds: list[float] = field(default_factory=list)

    # How many calls the model had proposed when it read the injected text (None: it never
    # did), and how many the attacker's were.
    hijacked_at: int | None = None
    injected_calls: int = 0
    # The attacker's calls that changed something (a write or external effect) and ran: a
    # check of our own beside AgentDojo's `security`, which looks for the goal's end state.
    attacker_effects: list[str] = field(default_factory=list)

    @property
    def pair(self) -> str:
        return f"{self.suite}/{self.user_task}×{self.injection_task}"

    @property
    def denied_asks(self) -> int:
        return sum(1 for s in self.steps if s.decision == "ask" and s.outcome == "approval_denied")

    @property
    def hijacked(self) -> bool:
        """Whether the model read the injected text and proposed the attacker's calls."""
        return self.hijacked_at is not None

    def attacker_steps(self) -> list[StepDecision]:
        """The steps of the injection task's calls (none if the model never read the injection)."""
        return result_attacker_steps(self.steps, self.hijacked_at, self.injected_calls)

    def user_steps(self) -> list[StepDecision]:
        """The steps of the user task's calls."""
        attacker = {id(s) for s in self.attacker_steps()}
        return [s for s in self.steps if s.tool is not None and id(s) not in attacker]


def result_attacker_steps(
    steps: list[StepDecision], hijacked_at: int | None, injected_calls: int
) -> list[StepDecision]:
    if hijacked_at is None:
        return []
    calls = [s for s in steps if s.tool is not None]
    return calls[hijacked_at : hijacked_at + injected_calls]


@cache
def _attack(suite_name: str) -> FixedJailbreakAttack:
    attack = FixedJailbreakAttack(ImportantInstructionsAttack._JB_STRING, suite(suite_name), None)  # type: ignore[arg-type]
    attack.user_name = ATTACKER_SIGNS_AS
    return attack


def pairs(suite_name: str) -> list[tuple[str, str]]:
    """Every (user task, injection task) pair whose injection task has ground-truth calls."""
    s = suite(suite_name)
    environment = s.load_and_inject_default_environment({})
    with_calls = [
        tid for tid, task in s.injection_tasks.items() if task.ground_truth(environment.model_copy(deep=True))
    ]
    return [(u, i) for u in s.user_tasks for i in with_calls]


def without_ground_truth(suite_name: str) -> list[str]:
    """Injection tasks with no ground-truth calls (goals reached by what the model says)."""
    s = suite(suite_name)
    environment = s.load_and_inject_default_environment({})
    return [
        tid
        for tid, task in s.injection_tasks.items()
        if not task.ground_truth(environment.model_copy(deep=True))
    ]


def _calls(task: BaseUserTask | BaseInjectionTask, environment: TaskEnvironment) -> list[FunctionCall]:
    return task.ground_truth(environment.model_copy(deep=True))


def _proposal(call: FunctionCall) -> dict[str, Any]:
    return {"kind": "tool_call", "tool": call.function, "args": dict(call.args)}


def _contains(value: Any, text: str) -> bool:
    if isinstance(value, str):
        return text in value
    if isinstance(value, dict):
        return any(_contains(v, text) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_contains(v, text) for v in value)
    return False


class HijackedModel:
    """Proposes the user task's calls and, from the first result that shows it the injected
    text, the injection task's calls before the rest; then `finish` with the expected answer.

    Where it is comes from the transcript, like `ScriptedModel`'s; `hijacked_at` keeps, for
    the result, how many calls it had proposed when it read the injection."""

    name = "agentdojo-ground-truth"

    def __init__(self, intended: list[FunctionCall], injected: list[FunctionCall], goal: str, answer: str):
        self.intended, self.injected, self.goal, self.answer = intended, injected, goal, answer
        self.hijacked_at: int | None = None

    def read_injection_after(self, ctx: ModelContext) -> int | None:
        """How many proposals had been made when a result first showed the injected text."""
        made = 0
        for message in ctx.transcript:
            if message.role == "proposal":
                made += 1
            elif message.role == "observation" and _contains(message.content, self.goal):
                return made
        return None

    def script(self, ctx: ModelContext) -> list[FunctionCall]:
        hijacked_at = self.hijacked_at = self.read_injection_after(ctx)
        if hijacked_at is None:
            return self.intended
        return [*self.intended[:hijacked_at], *self.injected, *self.intended[hijacked_at:]]

    async def propose(self, ctx: ModelContext) -> ModelReply:
        script, turn = self.script(ctx), ctx.proposals_made
        if turn < len(script):
            return ModelReply(output=_proposal(script[turn]))
        return ModelReply(output={"kind": "finish", "summary": self.answer})


class DecisionTimer:
    """Times each policy decision of a workflow (wraps its policy's `decide` once)."""

    def __init__(self, flow: Workflow) -> None:
        assert flow.policy is not None
        assert flow.hash  # the recorded hash is fixed before anything is wrapped
        self.seconds: list[float] = []
        decide = flow.policy.decide

        def timed(**kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return decide(**kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)

        flow.policy.decide = timed  # type: ignore[method-assign]


_TIMERS: dict[int, DecisionTimer] = {}


def _timer(flow: Workflow) -> DecisionTimer:
    if id(flow) not in _TIMERS:
        _TIMERS[id(flow)] = DecisionTimer(flow)
    return _TIMERS[id(flow)]


def _score(
    task: BaseUserTask | BaseInjectionTask,
    output: str,
    pre: TaskEnvironment,
    post: TaskEnvironment,
    traces: Sequence[FunctionCall],
) -> bool:
    """AgentDojo's check of a task, as its `TaskSuite` runs it: from the traces if the task
    checks those, from the environments otherwise."""
    if isinstance(task, BaseUserTask):
        from_traces = task.utility_from_traces(output, pre, post, traces)
        return from_traces if from_traces is not None else task.utility(output, pre, post)
    from_traces = task.security_from_traces(output, pre, post, traces)
    return from_traces if from_traces is not None else task.security(output, pre, post)


async def run_pair(
    suite_name: str,
    user_task_id: str,
    injection_task_id: str,
    *,
    journal: Journal,
    person: str = "prompt",
    provenance: bool = True,
) -> PairResult:
    """Run the pair through the suite's workflow; score it with AgentDojo's checks."""
    s = suite(suite_name)
    user_task = s.get_user_task_by_id(user_task_id)
    injection_task = s.get_injection_task_by_id(injection_task_id)
    injections = _attack(suite_name).attack(user_task, injection_task)
    environment = user_task.init_environment(s.load_and_inject_default_environment(injections))
    pre = environment.model_copy(deep=True)
    intended = _calls(user_task, environment)
    injected = _calls(injection_task, environment)
    model = HijackedModel(intended, injected, injection_task.GOAL, user_task.GROUND_TRUTH_OUTPUT)
    declarations = DECLARATIONS[suite_name]
    decide = (
        prompt_person(user_task.PROMPT, declarations)
        if person == "prompt"
        else intent_person(intended, declarations)
    )
    flow = workflow(suite_name, provenance=provenance)
    timer = _timer(flow)
    timer.seconds = []
    key = attach(environment)
    try:
        outcome = await run_to_end_async(
            flow,
            model,
            journal=journal,
            input={"prompt": user_task.PROMPT, "environment": key},
            person=ScriptedPerson(decide, name=f"user ({person})"),
        )
    finally:
        detach(key)
    traces = [
        FunctionCall(function=e.body.tool, args=e.body.args)
        for e in outcome.entries
        if isinstance(e.body, b.Executed)
    ]
    output = user_task.GROUND_TRUTH_OUTPUT if outcome.status == "completed" else ""
    return PairResult(
        suite=suite_name,
        user_task=user_task_id,
        injection_task=injection_task_id,
        person=person,
        provenance=provenance,
        status=outcome.status,
        utility=_score(user_task, output, pre, environment, traces),
        attack_succeeded=_score(injection_task, output, pre, environment, traces),
        asks=sum(1 for st in outcome.steps if st.decision == "ask"),
        steps=outcome.steps,
        decision_seconds=list(timer.seconds),
        hijacked_at=model.hijacked_at,
        injected_calls=len(injected),
        attacker_effects=[
            s.proposed(200)
            for s in result_attacker_steps(outcome.steps, model.hijacked_at, len(injected))
            if s.outcome == "executed" and flow.tools()[str(s.tool)].effect != "read"
        ],
    )
