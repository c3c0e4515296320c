"""The retail workflow's deterministic step: check the database before anyone acts on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tether import Next


def intake(data: dict[str, Any]) -> Next:
    """Pin the run to one database file, by absolute path, so every process acts on the same one."""
    given = data.get("db")
    if not isinstance(given, str) or not given:
        raise ValueError('the run input must name the retail database: --input \'{"db": "path/to/db.json"}\'')
    path = Path(given).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"retail database not found: {path}")
    return Next("authenticate", update={"db": str(path)})
