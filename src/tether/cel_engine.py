"""The CEL engine: the compiled module of the `common-expression-language` package, alone.

That package's `__init__` also imports its interactive command-line tool (typer, rich,
prompt_toolkit, pygments, wcwidth), about 150 ms of every process that imports tether, for
nothing tether uses. This module loads only the compiled extension the package wraps; when
the package's layout is not the one expected (another release), it imports the whole
package instead, so a change there costs start-up time, never correctness. Every module of
tether that evaluates CEL imports `Context`, `Program` and `compile` from here.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING


def _native_module() -> ModuleType:
    loaded = sys.modules.get("cel.cel")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("cel")  # locates the package without running it
    for folder in (package.submodule_search_locations or []) if package else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = Path(folder) / f"cel{suffix}"
            spec = importlib.util.spec_from_file_location("cel.cel", path)
            if not path.is_file() or spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            # Registered under its real name: a later `import cel` reuses it.
            sys.modules["cel.cel"] = module
            return module
    import cel

    return cel


if TYPE_CHECKING:
    from cel.cel import Context, Program, compile
else:
    _cel = _native_module()
    Context, Program, compile = _cel.Context, _cel.Program, _cel.compile

__all__ = ["Context", "Program", "compile"]
