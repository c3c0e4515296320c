"""The workflows a worker may drive: loaded at startup from folders an operator named.

A queued run names its workflow by reference (`workflow_ref`, a folder path) and pins it by
content hash. Loading a workflow imports its code, so a worker must never load what the
journal names: anyone who can submit a run or write the database would run code on every
worker. Instead a worker is started with workflow *roots* (`tether worker --workflows DIR`),
loads every workflow found under them once — each folder holding `workflow.yaml`, with
the older versions kept beside it as `workflow.<v>.yaml` — and drives a run only if the
hash it is pinned to is one of them. `workflow_ref` is never read.

A policy file given at submit time (`policy_ref`) is data, not code; it is read only when
it lies under a root, and used only if its hash is the one the run is pinned to.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tether.errors import TetherError
from tether.journal import RunRecord
from tether.loader import WORKFLOW_FILE, load_workflow_async, versions
from tether.policy import Policy
from tether.workflow import Workflow

ROOTS_ENV = "TETHER_WORKFLOWS"


class NotRegistered(TetherError):
    """A run names a workflow, a policy or code that is not under the worker's roots."""


@dataclass
class Registry:
    """Workflows by hash, from the roots; `problems` are the files that did not load, and why."""

    roots: tuple[Path, ...]
    workflows: dict[str, Workflow] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # The folder each workflow (by hash) was loaded from: what a run started from it names.
    folders: dict[str, Path] = field(default_factory=dict)
    _variants: dict[tuple[str, str], Workflow] = field(default_factory=dict)

    @classmethod
    async def load(cls, roots: Iterable[str | Path]) -> Registry:
        """Load every workflow version under `roots`; a root that is not a folder is an error."""
        resolved = []
        for root in roots:
            path = Path(root).expanduser().resolve()
            if not path.is_dir():
                raise NotRegistered(f"workflow root {root} is not a folder")
            resolved.append(path)
        if not resolved:
            raise NotRegistered(f"give the worker its workflow folders: --workflows DIR, or ${ROOTS_ENV}")
        registry = cls(tuple(resolved))
        for folder in _workflow_folders(registry.roots):
            for file in versions(folder):
                try:
                    workflow = await load_workflow_async(file)
                except TetherError as exc:
                    registry.problems.append(f"{file}: {exc}")
                    continue
                registry.workflows.setdefault(workflow.hash, workflow)
                registry.folders.setdefault(workflow.hash, folder)
        return registry

    def named(self, name: str, version: str | None = None) -> Workflow:
        """The workflow called `name` (its newest version, or `version`); NotRegistered if
        the roots hold none. Newest: the folder's `workflow.yaml`, loaded first."""
        for workflow in self.workflows.values():
            if workflow.name == name and (version is None or workflow.version == version):
                return workflow
        known = sorted({f"{w.name} {w.version}" for w in self.workflows.values()})
        wanted = f"{name} version {version}" if version is not None else name
        raise NotRegistered(
            f"no workflow {wanted} under this server's roots (known: {', '.join(known) or 'none'})"
        )

    def workflow_for(self, record: RunRecord) -> Workflow:
        """The workflow this run is pinned to, with its pinned policy; NotRegistered if the
        roots hold neither."""
        workflow = self.workflows.get(record.workflow_hash)
        if workflow is None:
            raise NotRegistered(
                f"workflow {record.workflow_name} {record.workflow_version} ({record.workflow_hash[:19]}…) "
                f"is not among the {len(self.workflows)} workflow version(s) under this worker's roots "
                f"({', '.join(map(str, self.roots))}); the run's workflow_ref is never loaded"
            )
        own = workflow.policy or Policy.default()
        if own.hash == record.policy_hash or record.policy_ref is None:
            return workflow  # a policy mismatch without an override is refused when resumed
        key = (workflow.hash, record.policy_hash)
        if key not in self._variants:
            policy = Policy.from_file(self.under_roots(record.policy_ref, "the run's policy file"))
            if policy.hash != record.policy_hash:
                raise NotRegistered(
                    f"the run's policy file {record.policy_ref} hashes to {policy.hash[:19]}…, not to the "
                    f"{record.policy_hash[:19]}… the run is pinned to"
                )
            variant = copy.copy(workflow)  # the hash does not cover the policy
            variant.policy = policy
            variant.validate()
            self._variants[key] = variant
        return self._variants[key]

    def under_roots(self, path: str | Path, what: str) -> Path:
        """`path`, resolved, if it lies under a root; NotRegistered otherwise."""
        resolved = Path(path).expanduser().resolve()
        if any(resolved.is_relative_to(root) for root in self.roots):
            return resolved
        raise NotRegistered(
            f"{what} {path} is not under this worker's roots ({', '.join(map(str, self.roots))})"
        )

    def module_root(self, module: str) -> Path | None:
        """The root holding `module` as a file (`a.b` → `a/b.py`), to import it from there."""
        relative = Path(*module.split(".")).with_suffix(".py")
        return next((root for root in self.roots if (root / relative).is_file()), None)


def _workflow_folders(roots: Iterable[Path]) -> Iterator[Path]:
    """Folders under the roots holding a workflow file (hidden folders, `__pycache__` and
    `node_modules` are not searched)."""
    seen: set[Path] = set()
    for root in roots:
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(
                d for d in subfolders if not d.startswith((".", "__")) and d != "node_modules"
            )
            path = Path(folder)
            if path not in seen and any(_is_workflow_file(f) for f in files):
                seen.add(path)
                yield path


def _is_workflow_file(name: str) -> bool:
    return name == WORKFLOW_FILE or (name.startswith("workflow.") and name.endswith(".yaml"))
