"""The intake step of the refund workflow that uses the refund skill."""

from __future__ import annotations

import re
from typing import Any

from tether import Next


def intake(data: dict[str, Any]) -> Next:
    """Deterministic: normalize the order id; reject one that is not an order id at all."""
    order_id = str(data.get("order_id", "")).strip().upper()
    if not re.fullmatch(r"[A-Z]-[0-9]{4}", order_id):
        return Next("rejected", update={"rejection": f"not an order id: {order_id or '(none)'}"})
    return Next("resolve", update={"order_id": order_id, "reason": str(data.get("reason", "not given"))})
