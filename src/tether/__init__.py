"""tether: a runtime for governed AI systems.

Workflows fix the allowed path; models propose the next local step inside a declared
envelope; the runtime authorizes, executes, verifies and records every step.
"""

from tether.budget import Budget, Limits, RunBudget
from tether.decision import Decision
from tether.errors import (
    ConcurrentWriteError,
    DefinitionError,
    InputError,
    JournalError,
    ModelSpecError,
    PolicyFileError,
    RunNotFound,
    RunStateError,
    TetherError,
    TicketError,
)
from tether.journal import Journal, open_journal
from tether.loader import load_workflow
from tether.models import FunctionModel, Model, ModelContext, ModelReply, ScriptedModel, Usage
from tether.policy import Policy
from tether.proposals import Exit, Finish, Handoff, Question, ToolCall
from tether.reasons import ReasonCode
from tether.runtime import RunResult, Runtime
from tether.sensitive import Sensitive, SensitiveKeyMissing
from tether.tools import Evidence, Tool, ToolContext, tool
from tether.workflow import AgentState, Next, Step, Terminal, Workflow

__version__ = "0.1.0"

__all__ = [
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
    "RunBudget",
    "RunNotFound",
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
]
