"""A decision on one proposal: what policy (or the runtime, before policy) said, and why.

Every governed step records one. `rule_id` names what decided (`refund-over-limit`,
`default:write`, `runtime:scope`, `approval:tkt_…`); `reason_code` is from the fixed
vocabulary in `tether.reasons`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from tether.reasons import ReasonCode

DecisionKind = Literal["allow", "deny", "ask", "defer"]


class Decision(msgspec.Struct, omit_defaults=True):
    """The outcome of policy evaluation for one proposal.

    `matched` lists the rules whose condition held; `evaluated` how each governing rule's
    condition came out (true, false or the error), `resolved` what the resolvers returned and
    `provenance` where the traced values came from: enough to explain the decision later
    without re-reading live state.

    In the journal a decision is stored without `policy_hash` (the run's pinned policy, in
    its `run_started` and `migrated` entries) and without `evaluated` (the pinned policy and
    `matched` give it back: every governing rule before the deciding one that is not in
    `matched` was false) — see `stored()`.
    """

    decision: DecisionKind
    rule_id: str
    reason_code: ReasonCode
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

    def stored(self) -> Decision:
        """The decision as a journal entry holds it."""
        if not self.policy_hash and not self.evaluated:
            return self
        return msgspec.structs.replace(self, policy_hash="", evaluated={})

    def as_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = msgspec.to_builtins(self)
        return values


def runtime_refusal(stage: str, code: ReasonCode, reason: str) -> Decision:
    """A refusal made by the runtime before or instead of policy (`runtime:STAGE`)."""
    return Decision("deny", f"runtime:{stage}", code, reason)
