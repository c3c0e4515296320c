"""Loading workflows from YAML files (tools named by import path) or Python objects.

`load_workflow(target)` accepts a directory holding `workflow.yaml`, a YAML file, or
`module:attribute` naming a `Workflow`; `await load_workflow_async(target)` does the same
inside a running event loop. Import paths in YAML resolve against the file's own directory
first. Every problem is reported as a DefinitionError naming its place.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from tether.budget import Budget, Limits, RunBudget
from tether.errors import DefinitionError, PolicyFileError
from tether.policy import Policy
from tether.strict_yaml import load_yaml
from tether.tools import Effect, Tool, Trust
from tether.workflow import AgentState, State, Step, Terminal, Workflow

if TYPE_CHECKING:  # the MCP SDK is an extra, imported only by workflows that name MCP servers
    from tether.mcp.catalog import McpCatalog

WORKFLOW_FILE = "workflow.yaml"
POLICY_FILE = "policy.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolRef(_Strict):
    ref: str
    effect: Effect | None = None
    idempotent: bool | None = None
    verify: str | None = None
    name: str | None = None
    # Provenance: the results' trust (MCP tools: untrusted unless declared), the
    # security-relevant parameters, ask-always (see tether.tools).
    results: Trust | None = None
    security: list[str] | None = None
    sensitive: bool | None = None
    # Parameters and result fields never recorded in clear: [NAME, result, result.PATH]
    # (tether.sensitive; `sensitive` above is the ask-always flag of provenance).
    sensitive_fields: list[str] | None = None
    # How a rollback undoes its effect: `module:func` (arguments of the same names), or
    # {tool: module:func, args: {PARAM: args.NAME | result.PATH}} (tether.tools.Compensation).
    compensate: str | CompensateDoc | None = None


class CompensateDoc(_Strict):
    tool: str
    args: dict[str, str] | None = None


class StepDoc(_Strict):
    kind: Literal["step"]
    run: str
    next: list[str] = Field(min_length=1)
    checkpoint: bool = True


class AgentDoc(_Strict):
    kind: Literal["agent"]
    instructions: str
    tools: list[str | ToolRef] = Field(default_factory=list)
    exits: dict[str, str]
    budget: Budget = Field(default_factory=Budget)
    escalate_to: str = "operator"
    handoff_to: list[str] = Field(default_factory=list)
    on_budget_exhausted: Literal["escalate", "fail"] = "escalate"
    on_verification_failed: Literal["retry", "escalate", "fail"] = "retry"
    # `rollback`: when the run fails in this state, the compensations of its effects run.
    on_failure: Literal["stop", "rollback"] = "stop"
    # Facts a person's answer may establish in this state: NAME -> what it is (tether.step).
    facts_from_answers: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], str] = Field(
        default_factory=dict
    )


class TerminalDoc(_Strict):
    kind: Literal["terminal"]
    failed: bool = False


class SkillStateDoc(_Strict):
    """An agent state made from a skill: `uses: PATH@VERSION` (a skill folder relative to the
    workflow file), every exit of the skill mapped to a state."""

    kind: Literal["skill"] = "skill"
    uses: str
    exits: dict[str, str]


def _state_kind(value: Any) -> str | None:
    """A state's kind; a state that `uses` a skill need not say `kind: skill`."""
    if isinstance(value, dict):
        return value.get("kind", "skill" if "uses" in value else None)
    return getattr(value, "kind", None)


StateDoc = Annotated[
    Annotated[StepDoc, Tag("step")]
    | Annotated[AgentDoc, Tag("agent")]
    | Annotated[TerminalDoc, Tag("terminal")]
    | Annotated[SkillStateDoc, Tag("skill")],
    Discriminator(_state_kind),
]


class WorkflowDoc(_Strict):
    name: str = Field(min_length=1)
    version: str | int
    description: str = ""
    start: str
    policy: str | None = None
    resolvers: dict[str, str] = Field(default_factory=dict)
    # name -> {command: [...]} or {url: ...}; checked by tether.mcp.catalog
    mcp_servers: dict[str, Any] = Field(default_factory=dict)
    budget: RunBudget = Field(default_factory=RunBudget)
    limits: Limits = Field(default_factory=Limits)
    # Findings of `tether check` the authors accept; read and checked by tether.analysis.check.
    acknowledge: list[Any] = Field(default_factory=list)
    states: dict[str, StateDoc] = Field(min_length=1)


def load_workflow(
    target: str | Path, *, policy: str | Path | None = None, pinned: str | None = None
) -> Workflow:
    """Load and validate a workflow; `policy` overrides the one the workflow names.

    With `pinned` (a workflow hash), a folder may hold several versions — `workflow.yaml`
    (the newest, for new runs) and older ones kept as `workflow.<anything>.yaml` while runs
    use them — and the one with that hash is loaded.

    Synchronous, for library users: MCP servers the workflow declares are listed in an
    event loop of the call's own, and their tools connect again in the loop that runs them.
    Code running in an event loop should await `load_workflow_async` instead.
    """

    async def load_and_disconnect() -> Workflow:
        workflow = await load_workflow_async(target, policy=policy, pinned=pinned)
        await _disconnect(workflow)
        return workflow

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(load_and_disconnect())
    # Called from a coroutine, which cannot wait on its own loop: load in a helper thread.
    with ThreadPoolExecutor(1, thread_name_prefix="tether-load") as pool:
        return pool.submit(asyncio.run, load_and_disconnect()).result()


async def load_workflow_async(
    target: str | Path, *, policy: str | Path | None = None, pinned: str | None = None
) -> Workflow:
    """`load_workflow` in the running event loop: the connections opened to list the MCP
    servers' tools stay open, and the runs this loop drives use them."""
    path = Path(target)
    if skill_file(path) is not None:
        return _skill_harness(path, policy, pinned)
    if pinned is not None and path.is_dir():
        return await _pinned_version(path, policy, pinned)
    if path.is_dir():
        path = path / WORKFLOW_FILE
        if not path.exists():
            raise DefinitionError(f"no {WORKFLOW_FILE} in directory {target}")
    if path.suffix in (".yaml", ".yml") or path.exists():
        return await _from_yaml(path, policy)
    if ":" in str(target):
        return _from_python(str(target), policy)
    raise DefinitionError(
        f"workflow not found: {target} (give a directory, a YAML file, or module:attribute)"
    )


def skill_file(path: Path) -> Path | None:
    """The skill file a target names: `skill.yaml`, or a folder holding it and no workflow."""
    if path.name == "skill.yaml" and path.is_file():
        return path
    if path.is_dir() and not (path / WORKFLOW_FILE).exists() and (path / "skill.yaml").is_file():
        return path / "skill.yaml"
    return None


def _skill_harness(path: Path, policy: str | Path | None, pinned: str | None) -> Workflow:
    """A skill alone, as a workflow (its scenarios run against it; see tether.skills)."""
    from tether.skills import load_skill

    workflow = load_skill(path).harness()
    if policy is not None:
        workflow.policy = Policy.from_file(policy)
        workflow.validate()
    if pinned is not None and workflow.hash != pinned:
        raise DefinitionError(
            f"skill {path} hashes to {workflow.hash[:19]}…, not {pinned[:19]}… as the run is pinned to"
        )
    return workflow


def versions(folder: Path) -> list[Path]:
    """The workflow files of a folder: the newest first, then older versions by name."""
    newest = folder / WORKFLOW_FILE
    older = sorted(p for p in folder.glob("workflow.*.yaml") if p != newest)
    return ([newest] if newest.exists() else []) + older


async def _pinned_version(folder: Path, policy: str | Path | None, pinned: str) -> Workflow:
    seen = []
    for file in versions(folder):
        workflow = await _from_yaml(file, policy)
        if workflow.hash == pinned:
            return workflow
        await _disconnect(workflow)
        seen.append(f"{file.name} (version {workflow.version}, {workflow.hash[:19]}…)")
    raise DefinitionError(
        f"no workflow in {folder} has the hash {pinned[:19]}… the run is pinned to (found: "
        f"{', '.join(seen) or 'none'}). Keep that version's file (e.g. workflow.v1.yaml) while runs "
        "use it, or move the run to another version explicitly: tether migrate RUN --to FOLDER"
    )


async def _disconnect(workflow: Workflow) -> None:
    """Close the running loop's connections to the workflow's MCP servers, if it has any."""
    if "tether.mcp.client" in sys.modules:  # only a workflow with MCP tools imported it
        from tether.mcp.client import close_servers

        await close_servers(workflow.tools().values())


def workflow_ref(target: str | Path) -> str:
    """A reference that `load_workflow` accepts from any working directory."""
    path = Path(target)
    return str(path.resolve()) if path.exists() else str(target)


def _from_python(ref: str, policy: str | Path | None) -> Workflow:
    obj = _import(ref, where="workflow", base=Path.cwd())
    if not isinstance(obj, Workflow):
        raise DefinitionError(f"{ref} is a {type(obj).__name__}, not a tether.Workflow")
    if policy is not None:
        obj.policy = Policy.from_file(policy)
        obj.validate()
    return obj


async def _from_yaml(path: Path, policy_override: str | Path | None) -> Workflow:
    try:
        content = load_yaml(path.read_text())
    except FileNotFoundError:
        raise DefinitionError(f"workflow file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionError(f"workflow file {path} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise DefinitionError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(content, dict):
        raise DefinitionError(f"{path}: a workflow file must be a mapping")
    try:
        doc = WorkflowDoc.model_validate(content)
    except ValidationError as exc:
        raise DefinitionError(f"{path}: " + _explain(exc)) from None
    base = path.parent.resolve()
    mcp = await _mcp_catalog(doc.mcp_servers, base, str(path)) if doc.mcp_servers else None
    states = [_state(name, s, base, f"{path}: state {name!r}", mcp) for name, s in doc.states.items()]
    policy = _policy(path, doc.policy, policy_override)
    resolvers = {
        n: _import(ref, where=f"{path}: resolver {n!r}", base=base) for n, ref in doc.resolvers.items()
    }
    return Workflow(
        doc.name,
        str(doc.version),
        doc.start,
        states,
        policy=policy,
        resolvers=resolvers,
        budget=doc.budget,
        limits=doc.limits,
        description=doc.description,
    )


def _policy(path: Path, declared: str | None, override: str | Path | None) -> Policy | None:
    """The policy a file-defined workflow runs under: the one given, else the one it names,
    else `policy.yaml` beside it if there is one. A policy that is named, either way, but
    cannot be read is an error naming the path tried, never a run without its rules."""
    if override is not None:
        return Policy.from_file(override)
    base = path.parent.resolve()
    if declared is not None:
        if not (base / declared).exists():
            raise PolicyFileError(f"{path} names policy {declared!r}, which is not found: {base / declared}")
        return Policy.from_file(base / declared)
    beside = base / POLICY_FILE
    return Policy.from_file(beside) if beside.exists() else None


def _state(
    name: str,
    doc: StepDoc | AgentDoc | TerminalDoc | SkillStateDoc,
    base: Path,
    where: str,
    mcp: McpCatalog | None,
) -> State:
    if isinstance(doc, TerminalDoc):
        return Terminal(name, failed=doc.failed)
    if isinstance(doc, SkillStateDoc):
        from tether.skills import load_skill, split_use  # skills load their tools through this module

        folder, version = split_use(doc.uses)
        kept = base / f"{folder}@{version}"  # a version kept beside the current one
        return load_skill(kept if kept.is_dir() else base / folder, version).state(name, doc.exits, where)
    if isinstance(doc, StepDoc):
        fn = _import(doc.run, where=f"{where}, run", base=base)
        if not callable(fn):
            raise DefinitionError(f"{where}: {doc.run} is not callable")
        return Step(name, fn, tuple(doc.next), checkpoint=doc.checkpoint)
    tools = [_tool(t, base, f"{where}, tool {i + 1}", mcp) for i, t in enumerate(doc.tools)]
    return AgentState(
        name,
        doc.instructions,
        tuple(tools),
        dict(doc.exits),
        budget=doc.budget,
        escalate_to=doc.escalate_to,
        handoff_to=tuple(doc.handoff_to),
        on_budget_exhausted=doc.on_budget_exhausted,
        on_verification_failed=doc.on_verification_failed,
        on_failure=doc.on_failure,
        facts_from_answers=dict(doc.facts_from_answers),
    )


def _tool(spec: str | ToolRef, base: Path, where: str, mcp: McpCatalog | None) -> Tool:
    ref = ToolRef(ref=spec) if isinstance(spec, str) else spec
    made = _plain_tool(ref, base, where, mcp)
    if ref.compensate is None:
        return made
    comp = ref.compensate if isinstance(ref.compensate, CompensateDoc) else CompensateDoc(tool=ref.compensate)
    undo = _plain_tool(ToolRef(ref=comp.tool), base, f"{where}, compensate", mcp)
    declared = copy.copy(made)  # a decorated tool may be named elsewhere without it
    declared.__dict__.pop("info", None)
    try:
        return declared.compensate_with(undo, comp.args)
    except ValueError as exc:
        raise DefinitionError(f"{where}: {ref.ref}: {exc}") from None


def _plain_tool(ref: ToolRef, base: Path, where: str, mcp: McpCatalog | None) -> Tool:
    if ref.ref.startswith("mcp:"):
        return _mcp_tool(ref, base, where, mcp)
    obj = _import(ref.ref, where=where, base=base)
    overrides = ref.effect, ref.idempotent, ref.verify, ref.name
    if isinstance(obj, Tool) and overrides == (None, None, None, None):
        return _declared(obj, ref, where) if _declares_provenance(ref) else obj
    fn: Callable[..., Any] = obj.fn if isinstance(obj, Tool) else obj
    if not callable(fn):
        raise DefinitionError(f"{where}: {ref.ref} is not a function")
    verify = (
        _import(ref.verify, where=f"{where}, verify", base=base)
        if ref.verify
        else (obj.verifier if isinstance(obj, Tool) else None)
    )
    # Undeclared stays undeclared (None: the most restrictive effect, flagged as such).
    effect = ref.effect or (obj.effect if isinstance(obj, Tool) and obj.effect_declared else None)
    idempotent = ref.idempotent
    if idempotent is None and isinstance(obj, Tool) and ref.effect is None:
        idempotent = obj.idempotent  # keep what the decorator declared unless the effect changes
    try:
        made = Tool(
            fn,
            name=ref.name or (obj.name if isinstance(obj, Tool) else None),
            effect=effect,
            idempotent=idempotent,
            verify=verify,
            description=obj.description if isinstance(obj, Tool) else None,
        )
    except (TypeError, ValueError) as exc:
        raise DefinitionError(f"{where}: {ref.ref}: {exc}") from None
    if isinstance(obj, Tool):  # keep what the decorator declared, unless the reference says otherwise
        made.declare(results=obj.results, security=obj.security, sensitive=obj.sensitive)
        made.declare_sensitive(sorted(obj.sensitive_fields - made.sensitive_fields))
    return _declared(made, ref, where)


def _declares_provenance(ref: ToolRef) -> bool:
    return (ref.results, ref.security, ref.sensitive, ref.sensitive_fields) != (None, None, None, None)


def _declared(tool: Tool, ref: ToolRef, where: str) -> Tool:
    """The tool with the reference's provenance declarations (a copy: a decorated tool may be
    named by other states and workflows with declarations of their own)."""
    if not _declares_provenance(ref):
        return tool
    declared = copy.copy(tool)
    declared.__dict__.pop("info", None)
    try:
        declared.declare(results=ref.results, security=ref.security, sensitive=ref.sensitive)
        declared.declare_sensitive(ref.sensitive_fields or [])
    except ValueError as exc:
        raise DefinitionError(f"{where}: {ref.ref}: {exc}") from None
    return declared


async def _mcp_catalog(declared: dict[str, Any], base: Path, where: str) -> McpCatalog:
    """List the declared MCP servers' tools (in parallel, in the running loop)."""
    try:
        from tether.mcp.catalog import McpCatalog
    except ImportError as exc:
        raise DefinitionError(
            f"{where}: mcp_servers needs the MCP SDK ({exc}): pip install 'tether[mcp]'"
        ) from None
    catalog = McpCatalog(declared, base, where)
    await catalog.list_tools()
    return catalog


def _mcp_tool(ref: ToolRef, base: Path, where: str, mcp: McpCatalog | None) -> Tool:
    """`mcp:SERVER/TOOL`: a tool of a declared MCP server, with the author's declarations."""
    if mcp is None:
        from tether.mcp.catalog import no_servers_declared

        raise no_servers_declared(ref.ref, where)
    verify = _import(ref.verify, where=f"{where}, verify", base=base) if ref.verify else None
    tool = mcp.tool(
        ref.ref, where, name=ref.name, effect=ref.effect, idempotent=ref.idempotent, verify=verify
    )
    return _declared(tool, ref, where)


@contextmanager
def _importable_from(base: Path) -> Iterator[None]:
    sys.path.insert(0, str(base))
    try:
        yield
    finally:
        sys.path.remove(str(base))


def _import(ref: str, *, where: str, base: Path) -> Any:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise DefinitionError(f"{where}: {ref!r} is not an import path of the form module:name")
    with _importable_from(base):
        try:
            module = importlib.import_module(module_name)
            _check_origin(module, module_name, base, where)
        except DefinitionError:
            raise
        except ImportError as exc:
            raise DefinitionError(f"{where}: cannot import module {module_name!r}: {exc}") from None
        except Exception as exc:  # the module itself is broken
            # The module is imported once, for the first reference to it: the failure may be
            # in any of its definitions, not the one named here.
            raise DefinitionError(
                f"{where}: importing {module_name!r} (first needed here) failed: {type(exc).__name__}: {exc}"
            ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DefinitionError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _check_origin(module: Any, name: str, base: Path, where: str) -> None:
    """Refuse a module of the same name already imported from another workflow's folder."""
    local = base / (name.replace(".", "/") + ".py")
    origin = getattr(module, "__file__", None)
    if local.exists() and origin is not None and Path(origin).resolve() != local.resolve():
        raise DefinitionError(
            f"{where}: module {name!r} is already imported from {origin}, not from {base}; "
            "give this workflow's module a distinct name"
        )


def _explain(exc: ValidationError) -> str:
    problems = []
    for e in exc.errors():
        loc = [str(p) for p in e["loc"]]
        if len(loc) > 2 and loc[0] == "states":
            del loc[2]  # the union tag ("agent", "step"...), which the file does not spell out
        loc = [p for p in loc if p not in ("str", "ToolRef")]
        problems.append(f"{'.'.join(loc) or '(workflow)'}: {e['msg']}")
    return "; ".join(dict.fromkeys(problems))
