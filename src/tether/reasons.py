"""The one fixed vocabulary of reason codes every decision and failure is recorded with."""

from __future__ import annotations

from enum import StrEnum


class ReasonCode(StrEnum):
    # Decisions taken by policy.
    POLICY_ALLOWED = "policy_allowed"
    POLICY_DENIED = "policy_denied"
    APPROVAL_REQUIRED = "approval_required"
    DEFERRED = "deferred"
    # Refusals before policy is consulted.
    MALFORMED_OUTPUT = "malformed_output"
    OUT_OF_SCOPE = "out_of_scope"
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"
    POLICY_ERROR = "policy_error"
    # A rule reading `history` governs the call, and the run's history is incomplete (the
    # calls carried into it from a session's earlier runs were cut at their bound).
    HISTORY_INCOMPLETE = "history_incomplete"
    # What happened when acting.
    TOOL_ERROR = "tool_error"
    MODEL_ERROR = "model_error"
    MODEL_TIMEOUT = "model_timeout"
    MODEL_RATE_LIMITED = "model_rate_limited"
    MODEL_UNAVAILABLE = "model_unavailable"
    MODEL_REJECTED = "model_rejected"
    VERIFICATION_FAILED = "verification_failed"
    EVIDENCE_MISSING = "evidence_missing"
    BUDGET_EXHAUSTED = "budget_exhausted"
    LOOP_DETECTED = "loop_detected"
    APPROVAL_DENIED = "approval_denied"
    APPROVAL_EXPIRED = "approval_expired"
    EFFECT_IN_DOUBT = "effect_in_doubt"
    # A call from an agent framework (tether.external): its run waits on a ticket for another
    # call; or the call a person approved is presented again with other arguments. Nothing ran.
    APPROVAL_PENDING = "approval_pending"
    APPROVAL_MISMATCH = "approval_mismatch"
    # An approved call's sensitive values are not recorded and this process does not hold
    # them (tether.sensitive): refused, for the model to propose again.
    SENSITIVE_VALUE_UNAVAILABLE = "sensitive_value_unavailable"
    STEP_FAILED = "step_failed"
    # Driving the run raised an error no stage expected, MAX_CRASHES times (see runtime.py).
    RUNTIME_ERROR = "runtime_error"
    # A worker cannot drive the run (its workflow or model cannot be loaded there): stuck
    # until a person acts (tether.operations) or a worker that can drive it claims it.
    NOT_DRIVABLE = "not_drivable"
    # Queued or running with no live lease: no worker has claimed it (yet).
    WAITING_FOR_WORKER = "waiting_for_worker"
    # People acting on a run (tether.operations).
    CANCELLED = "cancelled"
    # A row the runtime would act on disagrees with the run's hash chain, the chain is
    # broken, or the journal's append-only triggers are gone (tether.journal.integrity).
    JOURNAL_TAMPERED = "journal_tampered"
