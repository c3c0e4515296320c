"""Where the definitions `tether diff` compares come from: folders, or git revisions of one.

Two versions of one workflow usually have tools modules of the same name. The loader
refuses a module of that name already imported from another folder, so each version is
loaded with the names of its folder's modules imported afresh, and whatever was imported
under those names before is put back afterwards.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tether.errors import DefinitionError
from tether.loader import load_workflow
from tether.workflow import Workflow


def folder_of(target: str | Path) -> Path:
    path = Path(target)
    return path if path.is_dir() else path.parent


@contextmanager
def own_modules(folder: Path) -> Iterator[None]:
    """Import the modules of `folder` afresh inside the block; restore sys.modules after."""
    names = {p.stem for p in folder.glob("*.py")} | {
        p.name for p in folder.iterdir() if (p / "__init__.py").exists()
    }

    def ours(key: str) -> bool:
        return key.partition(".")[0] in names

    saved = {k: m for k, m in sys.modules.items() if ours(k)}
    for key in saved:
        del sys.modules[key]
    try:
        yield
    finally:
        for key in [k for k in sys.modules if ours(k)]:
            del sys.modules[key]
        sys.modules.update(saved)


def load_version(target: str | Path) -> Workflow:
    """Load a workflow beside others that use the same module names."""
    with own_modules(folder_of(target)):
        return load_workflow(target)


def _git(folder: Path, *args: str) -> bytes:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, timeout=60)
    except FileNotFoundError:
        raise DefinitionError("git is not installed: --from and --to need it") from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip()
        raise DefinitionError(f"git {' '.join(args)} (in {folder}): {message}")
    return done.stdout


def revision_name(target: str | Path, rev: str) -> str:
    """A revision as git names it: `REV (abc1234)`."""
    commit = _git(folder_of(target), "rev-parse", "--short", f"{rev}^{{commit}}").decode().strip()
    return f"{rev} ({commit})" if commit != rev else rev


def checkout(target: str | Path, rev: str, into: Path) -> Path:
    """Write the workflow folder as it is at revision `rev` under `into`; return the target
    (folder or file) inside it. Reads the repository only (git archive)."""
    path = Path(target)
    folder = folder_of(path).resolve()
    root = Path(_git(folder, "rev-parse", "--show-toplevel").decode().strip()).resolve()
    relative = folder.relative_to(root)
    archive = _git(root, "archive", "--format=tar", rev, "--", str(relative))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    copied = into / relative
    if not copied.exists():
        raise DefinitionError(f"{relative} does not exist at revision {rev}")
    return copied if path.is_dir() else copied / path.name
