"""Canonical paths for policy conditions: the `realpath` resolver every workflow has.

A condition over a path as it was written is not a boundary. `notes/link/x` is outside
`notes/` when `link` is a symlink out of it; `notes/../private`, `notes//x`, `notes/./x`
spell places in several ways; a name that differs from an existing one only in Unicode
normalization may be mapped onto it by the server. `realpath(args.path)` gives a condition
the place the operating system will reach: absolute, with `.`, `..`, repeated slashes and
every symlink resolved, for a path that may not exist yet too (its deepest existing parent
is resolved and the rest appended). Paths it cannot resolve to one place are refused — the
resolver raises, and the decision is `deny` with `policy_error`:

- a relative path without a base: servers resolve them differently (the MCP filesystem
  server against its allowed folders, others against their working directory), so say
  which: `realpath(args.path, "/srv/notes")`;
- a `..` after a symlink: the kernel takes it after following the link, a server that
  normalizes the text first (Node's `path.resolve`) before — two different places;
- a missing name that matches an existing entry only after Unicode normalization (NFC),
  which the MCP filesystem server would follow;
- a symlink loop.

What it cannot do: the check happens before the call, the write after it. A process that
swaps a folder for a symlink in between (time of check to time of use) is not stopped here;
only the server (or the operating system's permissions) can close that window.
"""

from __future__ import annotations

import os
import unicodedata

from tether.tools import ToolContext


def realpath(ctx: ToolContext, path: str, base: str | None = None) -> str:
    """The fully resolved absolute path `path` names (relative paths against `base`)."""
    del ctx  # resolvers receive the step's context; a path does not depend on it
    if not isinstance(path, str) or (base is not None and not isinstance(base, str)):
        raise TypeError("realpath takes a path string (and optionally the base folder of a relative one)")
    if "\0" in path:
        raise ValueError(f"path {path!r} contains a NUL byte")
    if path == "~" or path.startswith("~/"):  # as shells and the MCP filesystem server expand it
        path = os.path.expanduser("~") + path[1:]
    if not os.path.isabs(path):
        if base is None:
            raise ValueError(
                f"relative path {path!r}: a server resolves it against a folder of its own; give "
                "absolute paths, or the folder they are relative to: realpath(args.path, BASE)"
            )
        path = os.path.join(os.path.realpath(base), path)
    physical = os.path.realpath(path)
    lexical = os.path.realpath(os.path.normpath(path))
    if physical != lexical:
        raise ValueError(
            f"path {path!r} is {physical} if '..' is taken after its symlinks and {lexical} if "
            "before: refused as ambiguous"
        )
    if os.path.islink(physical):
        raise ValueError(f"path {path!r} does not resolve: a symlink loop")
    _no_lookalike(physical, path)
    return physical


def _no_lookalike(resolved: str, path: str) -> None:
    """Refuse a path whose first missing name is another spelling of an existing entry."""
    parent, missing = resolved, None
    while not os.path.lexists(parent):
        parent, missing = os.path.dirname(parent), os.path.basename(parent)
    if missing is None:
        return
    wanted = unicodedata.normalize("NFC", missing)
    try:
        entries = os.listdir(parent)
    except OSError as exc:
        raise ValueError(f"path {path!r}: cannot list {parent}: {exc.strerror}") from None
    twins = [e for e in entries if e != missing and unicodedata.normalize("NFC", e) == wanted]
    if twins:
        raise ValueError(
            f"path {path!r}: {missing!r} does not exist but {twins[0]!r} in {parent} is the same name "
            "after Unicode normalization: refused as ambiguous"
        )
