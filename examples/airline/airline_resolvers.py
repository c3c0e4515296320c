"""Read-only lookups the airline policy calls: `user(id)`, `reservation(id)`, `flight(number)`.

Each finds the database at `ctx.data["db"]` and returns its record, or null when there is none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tether import ToolContext


def _db(ctx: ToolContext) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(str(ctx.data["db"])).read_text())
    return data


def user(ctx: ToolContext, user_id: str) -> dict[str, Any] | None:
    """The user's profile (payment methods keyed by id, membership), or null."""
    found: dict[str, Any] | None = _db(ctx)["users"].get(user_id)
    return found


def reservation(ctx: ToolContext, reservation_id: str) -> dict[str, Any] | None:
    """The reservation, or null."""
    found: dict[str, Any] | None = _db(ctx)["reservations"].get(reservation_id)
    return found


def flight(ctx: ToolContext, flight_number: str) -> dict[str, Any] | None:
    """The flight (origin, destination, status per date), or null."""
    found: dict[str, Any] | None = _db(ctx)["flights"].get(flight_number)
    return found
