"""The airline workflow's deterministic step: pin the run to one database file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tether import Next


def intake(data: dict[str, Any]) -> Next:
    """The database named in the input, by absolute path."""
    given = data.get("db")
    if not isinstance(given, str) or not given:
        raise ValueError(
            'the run input must name the airline database: --input \'{"db": "path/to/db.json"}\''
        )
    path = Path(given).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"airline database not found: {path}")
    return Next("serve", update={"db": str(path)})
