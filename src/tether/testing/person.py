"""A scripted person: decides a run's tickets by rule, as a person would from the command line.

Rules come in two forms. Declarative, one mapping per rule, the first that matches decides:

    - {tool: issue_refund, when: "args.amount < 200.0", approve: true}
    - {tool: issue_refund, deny: "200 or more goes through finance"}
    - {question: true, answer: "the blue one"}
    - {take_over: true}

or a Python callable taking the `Ticket` and returning a `Verdict` (None: no rule).
A rule matches approval tickets for the tools (`tool`) or exits (`exit`) it names,
question tickets (`question: true`), or, naming none of them, every ticket; `approver`
narrows it to tickets for that role, and `when` is a CEL condition over the ticket's
`args`, `subject` (`issue_refund`, `exit:refunded`, `question`), `approver` and `question`.

Taking over means the person takes the run out of the automated loop: the run is left as
it is (paused on the ticket, with the person as its owner) and driving stops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

from tether import cel_engine as cel
from tether.journal import Ticket

DEFAULT_NAME = "scripted-person"
CONDITION_VARIABLES = frozenset({"args", "subject", "approver", "question"})


@dataclass(frozen=True)
class Verdict:
    """What the person does with one ticket. Build with `approve`, `deny`, `answer`, `take_over`."""

    action: Literal["approve", "deny", "answer", "take_over"]
    text: str = ""

    @classmethod
    def approve(cls, reason: str = "") -> Verdict:
        return cls("approve", reason)

    @classmethod
    def deny(cls, reason: str) -> Verdict:
        return cls("deny", reason)

    @classmethod
    def answer(cls, text: str) -> Verdict:
        return cls("answer", text)

    @classmethod
    def take_over(cls) -> Verdict:
        return cls("take_over")

    def describe(self) -> str:
        said = f": {self.text}" if self.text else ""
        return self.action.replace("_", " ") + said


class PersonHasNoRule(LookupError):
    """A run asked the scripted person something none of its rules decides."""


class PersonRule(BaseModel):
    """One declarative rule: what it matches, and exactly one action."""

    model_config = ConfigDict(extra="forbid")

    tool: str | list[str] | None = None
    exit: str | list[str] | None = None
    question: bool = False
    approver: str | None = None
    when: str | None = None
    approve: bool = False
    deny: str | None = None
    answer: str | None = None
    take_over: bool = False
    reason: str = ""
    _program: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_action(self) -> PersonRule:
        actions = [
            name
            for name, given in (
                ("approve", self.approve),
                ("deny", self.deny is not None),
                ("answer", self.answer is not None),
                ("take_over", self.take_over),
            )
            if given
        ]
        if len(actions) != 1:
            raise ValueError(
                "give exactly one action: approve: true, deny: REASON, answer: TEXT or take_over: true"
                + (f" (this rule gives {', '.join(actions)})" if actions else "")
            )
        if self.question and (self.tool is not None or self.exit is not None):
            raise ValueError("a rule matches questions (question: true) or tools and exits, not both")
        if self.tool is not None and self.exit is not None:
            raise ValueError("give 'tool' or 'exit', not both")
        if self.answer is not None and not self.question:
            raise ValueError("'answer' answers questions: add question: true")
        if self.approve and self.question:
            raise ValueError("a question is answered, not approved: use answer: TEXT")
        if self.reason and not self.approve:
            raise ValueError("'reason' goes with approve (deny: takes its reason as its value)")
        if self.when is not None:
            try:
                self._program = cel.compile(self.when)
            except ValueError as exc:
                raise ValueError(f"condition does not parse: {exc}") from None
            unknown = sorted(set(self._program.variables()) - CONDITION_VARIABLES)
            if unknown:
                raise ValueError(
                    f"unknown name(s) {', '.join(unknown)} in condition "
                    f"(a person's conditions may use: {', '.join(sorted(CONDITION_VARIABLES))})"
                )
        return self

    def matches(self, ticket: Ticket) -> bool:
        if self.approver is not None and ticket.approver != self.approver:
            return False
        if ticket.kind == "question":
            selected = self.tool is None and self.exit is None and not self.approve
        elif self.tool is not None:
            selected = ticket.subject in _names(self.tool)
        elif self.exit is not None:
            selected = ticket.subject in {f"exit:{n}" for n in _names(self.exit)}
        else:
            selected = not self.question and self.answer is None
        return selected and (self._program is None or self._holds(ticket))

    def _holds(self, ticket: Ticket) -> bool:
        values = {
            "args": ticket.args,
            "subject": ticket.subject,
            "approver": ticket.approver,
            "question": ticket.question or "",
        }
        try:
            value = self._program.execute(cel.Context(values))
        except Exception as exc:  # the CEL runtime raises KeyError, TypeError, ValueError...
            raise PersonHasNoRule(
                f"the scripted person's condition {self.when!r} could not be evaluated on ticket "
                f"{ticket.ticket_id} ({describe_ticket(ticket)}): {exc}"
            ) from None
        if not isinstance(value, bool):
            raise PersonHasNoRule(
                f"the scripted person's condition {self.when!r} gave {value!r}, not true/false"
            )
        return value

    def verdict(self) -> Verdict:
        if self.approve:
            return Verdict.approve(self.reason)
        if self.deny is not None:
            return Verdict.deny(self.deny)
        if self.answer is not None:
            return Verdict.answer(self.answer)
        return Verdict.take_over()


def _names(value: str | list[str]) -> set[str]:
    return {value} if isinstance(value, str) else set(value)


TicketRule = Callable[[Ticket], "Verdict | None"]


class ScriptedPerson:
    """Decides tickets by rule; `name` is who the journal records as deciding."""

    def __init__(
        self,
        rules: Sequence[PersonRule | Mapping[str, Any]] | TicketRule,
        name: str = DEFAULT_NAME,
    ) -> None:
        self.name = name
        self._fn: TicketRule | None = None
        self.rules: list[PersonRule] = []
        if callable(rules):
            self._fn = rules
        else:
            self.rules = [r if isinstance(r, PersonRule) else PersonRule.model_validate(r) for r in rules]

    def decide(self, ticket: Ticket) -> Verdict:
        """The verdict on a ticket, or PersonHasNoRule naming the ticket."""
        if self._fn is not None:
            verdict = self._fn(ticket)
            if verdict is not None and not isinstance(verdict, Verdict):
                raise TypeError(
                    f"the scripted person's function returned {type(verdict).__name__}, expected a Verdict"
                )
        else:
            verdict = next((rule.verdict() for rule in self.rules if rule.matches(ticket)), None)
        if verdict is None:
            raise PersonHasNoRule(
                f"the scripted person has no rule for ticket {ticket.ticket_id} ({describe_ticket(ticket)})"
            )
        if verdict.action == "answer" and ticket.kind != "question":
            raise PersonHasNoRule(
                f"ticket {ticket.ticket_id} is an approval, not a question: it cannot be answered"
            )
        if verdict.action == "approve" and ticket.kind == "question":
            raise PersonHasNoRule(f"ticket {ticket.ticket_id} is a question: answer it, do not approve it")
        return verdict


def describe_ticket(ticket: Ticket) -> str:
    """A ticket in one line: `approval of issue_refund(amount=180.0, …) for supervisor`."""
    if ticket.kind == "question":
        return f"question {ticket.question!r} for {ticket.approver}"
    args = ", ".join(f"{k}={v!r}" for k, v in ticket.args.items())
    return f"approval of {ticket.subject}({args}) for {ticket.approver}"
