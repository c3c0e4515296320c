"""The public API is small and deliberate: changing it must be a visible decision."""

from __future__ import annotations

import tether

EXPECTED = {
    "AgentState",
    "Budget",
    "ConcurrentWriteError",
    "Decision",
    "DefinitionError",
    "Evidence",
    "Exit",
    "Finish",
    "FunctionModel",
    "Handoff",
    "InputError",
    "Journal",
    "JournalError",
    "Limits",
    "Model",
    "ModelContext",
    "ModelReply",
    "ModelSpecError",
    "Next",
    "Policy",
    "PolicyFileError",
    "Question",
    "ReasonCode",
    "RunNotFound",
    "RunBudget",
    "RunResult",
    "RunStateError",
    "Runtime",
    "ScriptedModel",
    "Sensitive",
    "SensitiveKeyMissing",
    "Step",
    "Terminal",
    "TetherError",
    "TicketError",
    "Tool",
    "ToolCall",
    "ToolContext",
    "Usage",
    "Workflow",
    "load_workflow",
    "open_journal",
    "tool",
}


def test_exported_names_are_exactly_the_documented_ones() -> None:
    assert set(tether.__all__) == EXPECTED
    assert all(hasattr(tether, name) for name in tether.__all__)


def test_the_kernel_imports_no_cli_or_vendor_code() -> None:
    # (The CEL package itself imports typer and rich for its own command line; we cannot avoid that.)
    import subprocess
    import sys

    code = (
        "import sys, tether, tether.runtime, tether.models, tether.loader, "
        "tether.operations, tether.sweeper, tether.external, tether.integrations; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('openai', 'anthropic', 'httpx', 'mcp', 'llama_cpp', 'agents', 'pydantic_ai', "
        "'langgraph', 'langchain_core') "
        "or m == 'tether.cli']; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_reason_codes_are_one_fixed_vocabulary() -> None:
    codes = {c.value for c in tether.ReasonCode}
    for required in (
        "policy_denied",
        "out_of_scope",
        "invalid_arguments",
        "tool_error",
        "verification_failed",
        "evidence_missing",
        "budget_exhausted",
        "loop_detected",
        "approval_denied",
        "approval_expired",
        "effect_in_doubt",
    ):
        assert required in codes
