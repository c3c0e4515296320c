"""A decision on one proposal: what policy (or the runtime, before policy) said, and why.

Every governed step records one. `rule_id` names what decided (`refund-over-limit`,
`default:write`, `runtime:scope`, `approval:tkt_…`); `reason_code` is from the fixed
vocabulary in `tether.reasons`.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import msgspec

from tether.reasons import ReasonCode

DecisionKind = Literal["allow", "deny", "ask", "defer"]
# The reason code each kind of decision implies (what policy gives a rule or default that
# decides so). A stored decision leaves it out when it is this one: see `Decision.stored()`.
REASON_OF: dict[str, ReasonCode] = {
    "allow": ReasonCode.POLICY_ALLOWED,
    "deny": ReasonCode.POLICY_DENIED,
    "ask": ReasonCode.APPROVAL_REQUIRED,
    "defer": ReasonCode.DEFERRED,
}
# `reason_code` not given (a stored decision that left it out): its kind's, set at once.
_IMPLIED = cast(ReasonCode, "")


class Decision(msgspec.Struct, omit_defaults=True):
    """The outcome of policy evaluation for one proposal.

    `matched` lists the rules whose condition held; `evaluated` how each governing rule's
    condition came out (true, false or the error), `resolved` what the resolvers returned and
    `provenance` where the traced values came from: enough to explain the decision later
    without re-reading live state.

    In the journal a decision is stored without `policy_hash` (the run's pinned policy, in
    its `run_started` and `migrated` entries) and without `evaluated` (the pinned policy and
    `matched` give it back: every governing rule before the deciding one that is not in
    `matched` was false) — see `stored()`. Its `reason_code` is left out when it is the one
    its kind implies (`REASON_OF`) and given back when it is read: every entry written before
    stores it, so an absent one is never another.
    """

    decision: DecisionKind
    rule_id: str
    reason_code: ReasonCode = _IMPLIED
    reason: str = ""
    policy_hash: str = ""
    approver: str | None = None
    owner: str | None = None
    expires_in: float | None = None
    # An ask rule's separation of duties: distinct approvers needed (None: one), and
    # whether the run's starter may approve (tether.identity).
    approvals: int | None = None
    forbid_self_approval: bool = False
    # The role an `ask` escalates the run to when its ticket expires (None: the call is denied).
    escalate_on_expiry: str | None = None
    matched: list[str] = []
    evaluated: dict[str, bool | str] = {}
    resolved: dict[str, Any] = {}
    # Where the values the decision looked at could have come from (tether.provenance):
    # `args.NAME` or `provenance(VALUE)` -> trusted, untrusted, derived, sources.
    provenance: dict[str, Any] = {}

    def __post_init__(self) -> None:
        # Runs on decoding too: a decision read without its reason code gets its kind's.
        if self.reason_code == _IMPLIED:
            self.reason_code = REASON_OF[self.decision]

    def stored(self) -> Decision:
        """The decision as a journal entry holds it: a decision that encodes without its
        reason code when that is its kind's (the same values, a subclass whose default it is)."""
        code = REASON_OF[self.decision]
        implied = _STORED[self.decision] if self.reason_code == code else Decision
        if type(self) is implied and not self.policy_hash and not self.evaluated:
            return self
        values = msgspec.structs.asdict(self) | {"policy_hash": "", "evaluated": {}}
        if implied is not Decision:
            values["reason_code"] = code  # the member itself: the default it is compared with
        return implied(**values)

    def checkpointed(self) -> Decision:
        """The decision as a paused run's checkpoint holds it: as stored, its reason code
        always written (a checkpoint is decoded and encoded again by later commits, which
        write it so: one form, not two)."""
        stored = self.stored()
        return stored if type(stored) is Decision else Decision(**msgspec.structs.asdict(stored))

    def as_dict(self) -> dict[str, Any]:
        """Every field but those at their default, the reason code always (a stored decision
        encodes without it when its kind implies it)."""
        values: dict[str, Any] = msgspec.to_builtins(self)
        values.setdefault("reason_code", str(self.reason_code))
        return values


# One subclass per kind, whose `reason_code` default is the kind's: msgspec leaves a field at
# its default out of the encoding (omit_defaults), and that default is per class.
class _StoredAllow(Decision, omit_defaults=True):
    reason_code: ReasonCode = ReasonCode.POLICY_ALLOWED


class _StoredDeny(Decision, omit_defaults=True):
    reason_code: ReasonCode = ReasonCode.POLICY_DENIED


class _StoredAsk(Decision, omit_defaults=True):
    reason_code: ReasonCode = ReasonCode.APPROVAL_REQUIRED


class _StoredDefer(Decision, omit_defaults=True):
    reason_code: ReasonCode = ReasonCode.DEFERRED


_STORED: dict[str, type[Decision]] = {
    "allow": _StoredAllow,
    "deny": _StoredDeny,
    "ask": _StoredAsk,
    "defer": _StoredDefer,
}


def runtime_refusal(stage: str, code: ReasonCode, reason: str) -> Decision:
    """A refusal made by the runtime before or instead of policy (`runtime:STAGE`)."""
    return Decision("deny", f"runtime:{stage}", code, reason)
