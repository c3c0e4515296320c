"""Read-only lookups the retail policy's conditions call: `order(id)`, `user(id)`, `item(id)`.

Each takes the step's `ToolContext` first (the runtime binds it) and finds the database at
`ctx.data["db"]`. They return the database's own records, or null when there is none, so a
condition can say `order(args.order_id) != null && order(args.order_id).status == "pending"`.
The file is parsed once per version of it (inode, size, modification time) and never copied:
resolvers only read.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tether import ToolContext

# The last few files read (a process serving many databases keeps only these parsed).
_KEEP = 8
_snapshots: dict[str, tuple[tuple[int, int, int], dict[str, Any], dict[str, dict[str, Any]]]] = {}


def _db(ctx: ToolContext) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    path = os.path.abspath(str(ctx.data["db"]))
    st = os.stat(path)
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # writers replace the file: a new inode
    cached = _snapshots.get(path)
    if cached is None or cached[0] != stamp:
        with open(path, encoding="utf-8") as f:
            db = json.load(f)
        items = {
            item_id: {**variant, "product_id": product["product_id"], "product_name": product["name"]}
            for product in db["products"].values()
            for item_id, variant in product["variants"].items()
        }
        cached = (stamp, db, items)
        _snapshots.pop(path, None)
        _snapshots[path] = cached  # the newest last: the oldest go first
        while len(_snapshots) > _KEEP:
            del _snapshots[next(iter(_snapshots))]
    return cached[1], cached[2]


def order(ctx: ToolContext, order_id: str) -> dict[str, Any] | None:
    """The order, or null."""
    return _db(ctx)[0]["orders"].get(order_id)


def user(ctx: ToolContext, user_id: str) -> dict[str, Any] | None:
    """The user's profile (with `payment_methods` keyed by id), or null."""
    return _db(ctx)[0]["users"].get(user_id)


def item(ctx: ToolContext, item_id: str) -> dict[str, Any] | None:
    """A product variant with its `product_id`, `price`, `available` and `options`, or null."""
    return _db(ctx)[1].get(item_id)
