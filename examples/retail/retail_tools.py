"""Tools of the retail example: tau2-bench's retail domain over a JSON database.

Two layers:

- **Pure actions** over a database dict, one per tool, in `ACTIONS` (tool name ->
  `fn(db, **arguments)`). A write mutates `db` in place and returns the changed order or
  user; it checks everything before changing anything, so a refused call leaves `db` as
  it was. Bad input raises `LookupError` (something named does not exist) or `ValueError`
  (it exists but the action is not allowed). `apply_actions(db, actions)` replays a list of
  `{"name", "arguments"}` calls, e.g. a tau2 task's ground truth, capturing errors.
- **tether tools** with tau2's names and parameters. Each finds the database file in the
  run's data (`data.db`); reads load it, writes load-mutate-save it under a file lock
  (`retail_db.update`). Every write has a verifier that re-reads the file from disk; the
  two user lookups have a verifier that establishes `facts.user_id`, the authenticated
  user (one per conversation).

Semantics follow tau2-bench's retail tools; where this module differs, it says so in the
action's comment (cancel refunds the net amount paid per payment method; amounts are
rounded to cents; an empty item list and an item changed into itself are refused).
"""

from __future__ import annotations

import ast
import copy
import json
import math
import operator
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import retail_db
from pydantic import Field

from tether import Evidence, ToolContext, tool

Db = dict[str, Any]

CANCEL_REASONS = ("no longer needed", "ordered by mistake")
ITEMS_MODIFIED = "pending (item modified)"  # tau2's exact status string
GIFT_CARD = "gift_card"
# An order holds a handful of items (at most 5 in tau2's database): a tight bound keeps the
# policy's per-item conditions (quadratic in the list) cheap whatever a model proposes.
MAX_ITEMS_PER_ORDER = 50
ItemIds = Annotated[list[str], Field(max_length=MAX_ITEMS_PER_ORDER)]


# -- lookups --------------------------------------------------------------------------------


def _fold(text: str) -> str:
    """Case- and accent-insensitive form of a name or email, for matching what people say.

    (As tau2's current lookups do; its earlier versions only ignored case.)
    """
    decomposed = unicodedata.normalize("NFKD", text.strip())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _order(db: Db, order_id: str) -> dict[str, Any]:
    order = db["orders"].get(order_id)
    if order is None:
        hint = "" if order_id.startswith("#") else " (order ids start with '#', such as '#W0000000')"
        raise LookupError(f"order {order_id} not found{hint}")
    return order


def _user(db: Db, user_id: str) -> dict[str, Any]:
    user = db["users"].get(user_id)
    if user is None:
        raise LookupError(f"user {user_id} not found")
    return user


def _product(db: Db, product_id: str) -> dict[str, Any]:
    product = db["products"].get(product_id)
    if product is None:
        raise LookupError(f"product {product_id} not found (product ids and item ids differ)")
    return product


def _product_of_item(db: Db, item_id: str) -> dict[str, Any] | None:
    return next((p for p in db["products"].values() if item_id in p["variants"]), None)


def _payment_method(db: Db, user_id: str, payment_method_id: str) -> dict[str, Any]:
    method = _user(db, user_id)["payment_methods"].get(payment_method_id)
    if method is None:
        raise LookupError(f"payment method {payment_method_id} not found for user {user_id}")
    return method


def _is_gift_card(method: Mapping[str, Any]) -> bool:
    return method.get("source") == GIFT_CARD


def _cents(amount: float) -> float:
    return round(amount, 2)


def _status_is(order: Mapping[str, Any], wanted: str, doing: str) -> None:
    if order["status"] != wanted:
        raise ValueError(
            f"order {order['order_id']} is not {wanted} (status: {order['status']!r}); "
            f"only {wanted} orders can be {doing}"
        )


def _net_paid(order: Mapping[str, Any]) -> dict[str, float]:
    """What each payment method has paid for the order, net of refunds (positive only)."""
    net: dict[str, float] = {}
    for txn in order["payment_history"]:
        sign = 1 if txn["transaction_type"] == "payment" else -1
        method = txn["payment_method_id"]
        net[method] = net.get(method, 0.0) + sign * txn["amount"]
    return {method: _cents(amount) for method, amount in net.items() if _cents(amount) > 0}


def _count_in_order(order: Mapping[str, Any], item_ids: list[str]) -> None:
    """Every listed item is in the order, as many times as it is listed."""
    # tau2 accepts an empty list (and would, e.g., mark an order "return requested" for
    # nothing); we refuse it.
    if not item_ids:
        raise ValueError("no items given")
    have = Counter(item["item_id"] for item in order["items"])
    for item_id, wanted in Counter(item_ids).items():
        if have[item_id] == 0:
            raise LookupError(f"item {item_id} is not in order {order['order_id']}")
        if wanted > have[item_id]:
            raise ValueError(
                f"item {item_id} is listed {wanted} times but order {order['order_id']} has {have[item_id]}"
            )


def _positions(order: Mapping[str, Any], item_ids: list[str]) -> list[int]:
    """A distinct position in `order["items"]` for each listed item id (duplicates allowed)."""
    _count_in_order(order, item_ids)
    taken: set[int] = set()
    positions = []
    for item_id in item_ids:
        pos = next(i for i, it in enumerate(order["items"]) if it["item_id"] == item_id and i not in taken)
        taken.add(pos)
        positions.append(pos)
    return positions


def _replacement(db: Db, item: Mapping[str, Any], new_item_id: str) -> dict[str, Any]:
    """The available variant `new_item_id` of the same product as the order's `item`."""
    # tau2 refuses an item modified into itself but accepts it in an exchange; the policy
    # asks for a different option in both, so we refuse it in both.
    if new_item_id == item["item_id"]:
        raise ValueError(f"new item {new_item_id} is the same as the item it would replace")
    product = _product(db, item["product_id"])
    variant = product["variants"].get(new_item_id)
    if variant is None:
        other = _product_of_item(db, new_item_id)
        if other is None:
            raise LookupError(f"item {new_item_id} not found")
        raise ValueError(
            f"item {new_item_id} is a {other['name']}, not a {product['name']}: "
            "an item can only be changed to another option of the same product"
        )
    if not variant["available"]:
        raise ValueError(f"item {new_item_id} ({product['name']}) is not available")
    return variant


def _replacements(
    db: Db, order: Mapping[str, Any], item_ids: list[str], new_item_ids: list[str]
) -> tuple[list[tuple[int, dict[str, Any]]], float]:
    """(position in the order, new variant) for each pair, and the total price difference."""
    if len(item_ids) != len(new_item_ids):
        raise ValueError(
            f"{len(item_ids)} item(s) to change but {len(new_item_ids)} new item(s): "
            "each item needs exactly one new item, in the same position"
        )
    changes = []
    diff = 0.0
    for pos, new_item_id in zip(_positions(order, item_ids), new_item_ids, strict=True):
        item = order["items"][pos]
        variant = _replacement(db, item, new_item_id)
        changes.append((pos, variant))
        diff += variant["price"] - item["price"]
    # tau2 rounds the exchange difference but not the modification's (whose transaction can
    # then read 6.319999999999993); we round both to cents.
    return changes, _cents(diff)


def _check_gift_card_covers(method: Mapping[str, Any], amount: float) -> None:
    if _is_gift_card(method) and _cents(method["balance"]) < _cents(amount):
        raise ValueError(
            f"insufficient gift card balance: {method['id']} has {method['balance']:.2f}, "
            f"{amount:.2f} is needed"
        )


def _address(address1: str, address2: str, city: str, state: str, country: str, zip: str) -> dict[str, str]:
    return {
        "address1": address1,
        "address2": address2,
        "city": city,
        "country": country,
        "state": state,
        "zip": zip,
    }


# -- reads ------------------------------------------------------------------------------------


def _find_user_id_by_email(db: Db, email: str) -> str:
    wanted = _fold(email)
    for user_id, user in db["users"].items():
        if _fold(user["email"]) == wanted:
            return user_id
    raise LookupError(f"no user with email {email}")


def _find_user_id_by_name_zip(db: Db, first_name: str, last_name: str, zip: str) -> str:
    first, last, code = _fold(first_name), _fold(last_name), zip.strip()
    for user_id, user in db["users"].items():
        name = user["name"]
        same_name = _fold(name["first_name"]) == first and _fold(name["last_name"]) == last
        if same_name and user["address"]["zip"] == code:
            return user_id
    raise LookupError(f"no user named {first_name} {last_name} with zip code {zip}")


def _get_user_details(db: Db, user_id: str) -> dict[str, Any]:
    return _user(db, user_id)


def _get_order_details(db: Db, order_id: str) -> dict[str, Any]:
    return _order(db, order_id)


def _get_product_details(db: Db, product_id: str) -> dict[str, Any]:
    return _product(db, product_id)


def _get_item_details(db: Db, item_id: str) -> dict[str, Any]:
    product = _product_of_item(db, item_id)
    if product is None:
        raise LookupError(f"item {item_id} not found (item ids and product ids differ)")
    return product["variants"][item_id]


def _list_all_product_types(db: Db) -> str:
    # tau2 returns a JSON string: product name -> product id, sorted by name.
    return json.dumps({p["name"]: p["product_id"] for p in db["products"].values()}, sort_keys=True)


_CALC_CHARS = frozenset("0123456789+-*/(). ")
_CALC_MAX_LENGTH = 500
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arithmetic(node: ast.expr) -> int | float:
    """Evaluate a parsed expression made only of numbers, + - * /, signs and parentheses."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _arithmetic(node.left), _arithmetic(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_arithmetic(node.operand))
    raise ValueError(f"unsupported element in expression: {type(node).__name__}")


def _calculate(db: Db | None, expression: str) -> str:
    # tau2 filters characters then calls eval; we filter the same characters, then parse
    # with `ast` and evaluate only numbers and + - * / (no **, no //, no names, no calls).
    if len(expression) > _CALC_MAX_LENGTH:
        raise ValueError(f"expression longer than {_CALC_MAX_LENGTH} characters")
    bad = sorted(set(expression) - _CALC_CHARS)
    if bad:
        raise ValueError(f"invalid characters in expression: {''.join(bad)!r}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        value = float(_arithmetic(tree.body))
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    except (ArithmeticError, RecursionError, MemoryError):
        raise ValueError(f"cannot compute {expression!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"cannot compute {expression!r}")
    return str(round(value, 2))


def _transfer_to_human_agents(db: Db | None, summary: str) -> str:
    return "Transfer successful"


# -- writes -----------------------------------------------------------------------------------


def _cancel_pending_order(db: Db, order_id: str, reason: str) -> dict[str, Any]:
    order = _order(db, order_id)
    _status_is(order, "pending", "cancelled")
    if reason not in CANCEL_REASONS:
        raise ValueError(f"invalid cancellation reason {reason!r}: must be one of {list(CANCEL_REASONS)}")
    # tau2 adds one refund per payment_history entry. We refund what each method has paid
    # net of refunds: the same for an order with one payment (every order in tau2's data),
    # and correct after a payment change (tau2 would refund the old method twice).
    refunds = _net_paid(order)
    methods = {m: _payment_method(db, order["user_id"], m) for m in refunds}
    for method_id, amount in refunds.items():
        order["payment_history"].append(
            {"transaction_type": "refund", "amount": amount, "payment_method_id": method_id}
        )
        if _is_gift_card(methods[method_id]):  # a gift card is refunded immediately
            methods[method_id]["balance"] = _cents(methods[method_id]["balance"] + amount)
    order["status"] = "cancelled"
    order["cancel_reason"] = reason
    return order


def _modify_pending_order_items(
    db: Db, order_id: str, item_ids: list[str], new_item_ids: list[str], payment_method_id: str
) -> dict[str, Any]:
    order = _order(db, order_id)
    if order["status"] != "pending":
        raise ValueError(
            f"order {order_id} is not pending (status: {order['status']!r}); only pending orders can have "
            "their items modified, and only once"
        )
    changes, diff = _replacements(db, order, item_ids, new_item_ids)
    method = _payment_method(db, order["user_id"], payment_method_id)
    _check_gift_card_covers(method, diff)
    # Like tau2: one transaction for the difference, a refund when it is zero or negative.
    order["payment_history"].append(
        {
            "transaction_type": "payment" if diff > 0 else "refund",
            "amount": abs(diff),
            "payment_method_id": payment_method_id,
        }
    )
    if _is_gift_card(method):
        method["balance"] = _cents(method["balance"] - diff)
    for pos, variant in changes:
        item = order["items"][pos]
        item["item_id"] = variant["item_id"]
        item["price"] = variant["price"]
        item["options"] = copy.deepcopy(variant["options"])
    order["status"] = ITEMS_MODIFIED
    return order


def _modify_pending_order_address(
    db: Db, order_id: str, address1: str, address2: str, city: str, state: str, country: str, zip: str
) -> dict[str, Any]:
    order = _order(db, order_id)
    # tau2 accepts any status containing "pending", including "pending (item modified)".
    if "pending" not in order["status"]:
        raise ValueError(f"order {order_id} is not pending (status: {order['status']!r}); cannot modify it")
    order["address"] = _address(address1, address2, city, state, country, zip)
    return order


def _modify_pending_order_payment(db: Db, order_id: str, payment_method_id: str) -> dict[str, Any]:
    order = _order(db, order_id)
    if "pending" not in order["status"]:
        raise ValueError(f"order {order_id} is not pending (status: {order['status']!r}); cannot modify it")
    method = _payment_method(db, order["user_id"], payment_method_id)
    history = order["payment_history"]
    if len(history) != 1 or history[0]["transaction_type"] != "payment":
        raise ValueError(
            f"the payment method of order {order_id} can be changed only while it has exactly one payment"
        )
    old_id, amount = history[0]["payment_method_id"], history[0]["amount"]
    if old_id == payment_method_id:
        raise ValueError(f"order {order_id} is already paid with {payment_method_id}")
    old = _payment_method(db, order["user_id"], old_id)
    _check_gift_card_covers(method, amount)
    history.append({"transaction_type": "payment", "amount": amount, "payment_method_id": payment_method_id})
    history.append({"transaction_type": "refund", "amount": amount, "payment_method_id": old_id})
    if _is_gift_card(method):
        method["balance"] = _cents(method["balance"] - amount)
    if _is_gift_card(old):
        old["balance"] = _cents(old["balance"] + amount)
    return order


def _modify_user_address(
    db: Db, user_id: str, address1: str, address2: str, city: str, state: str, country: str, zip: str
) -> dict[str, Any]:
    user = _user(db, user_id)
    user["address"] = _address(address1, address2, city, state, country, zip)
    return user


def _return_delivered_order_items(
    db: Db, order_id: str, item_ids: list[str], payment_method_id: str
) -> dict[str, Any]:
    order = _order(db, order_id)
    _status_is(order, "delivered", "returned")
    method = _payment_method(db, order["user_id"], payment_method_id)
    original = order["payment_history"][0]["payment_method_id"]
    if not _is_gift_card(method) and payment_method_id != original:
        raise ValueError(
            f"a refund must go to the original payment method ({original}) or a gift card, "
            f"not {payment_method_id}"
        )
    _count_in_order(order, item_ids)
    order["status"] = "return requested"
    order["return_items"] = sorted(item_ids)
    order["return_payment_method_id"] = payment_method_id
    return order


def _exchange_delivered_order_items(
    db: Db, order_id: str, item_ids: list[str], new_item_ids: list[str], payment_method_id: str
) -> dict[str, Any]:
    order = _order(db, order_id)
    _status_is(order, "delivered", "exchanged")
    _, diff = _replacements(db, order, item_ids, new_item_ids)
    method = _payment_method(db, order["user_id"], payment_method_id)
    _check_gift_card_covers(method, diff)
    # Like tau2: the difference is recorded on the order and settled later; no transaction
    # and no gift card change now.
    order["status"] = "exchange requested"
    order["exchange_items"] = sorted(item_ids)
    order["exchange_new_items"] = sorted(new_item_ids)
    order["exchange_payment_method_id"] = payment_method_id
    order["exchange_price_difference"] = diff
    return order


ACTIONS: dict[str, Callable[..., Any]] = {
    "find_user_id_by_email": _find_user_id_by_email,
    "find_user_id_by_name_zip": _find_user_id_by_name_zip,
    "get_user_details": _get_user_details,
    "get_order_details": _get_order_details,
    "get_product_details": _get_product_details,
    "get_item_details": _get_item_details,
    "list_all_product_types": _list_all_product_types,
    "calculate": _calculate,
    "cancel_pending_order": _cancel_pending_order,
    "modify_pending_order_items": _modify_pending_order_items,
    "modify_pending_order_address": _modify_pending_order_address,
    "modify_pending_order_payment": _modify_pending_order_payment,
    "modify_user_address": _modify_user_address,
    "return_delivered_order_items": _return_delivered_order_items,
    "exchange_delivered_order_items": _exchange_delivered_order_items,
    "transfer_to_human_agents": _transfer_to_human_agents,
}
"""Tool name -> pure action `fn(db, **arguments)`."""

WRITE_ACTIONS = frozenset(
    {
        "cancel_pending_order",
        "modify_pending_order_items",
        "modify_pending_order_address",
        "modify_pending_order_payment",
        "modify_user_address",
        "return_delivered_order_items",
        "exchange_delivered_order_items",
    }
)
"""The actions that change the database."""


@dataclass(frozen=True)
class ActionFailed:
    """The result of an action that raised, as `apply_actions` records it."""

    name: str
    error: str

    def __str__(self) -> str:
        return f"{self.name}: {self.error}"


def apply_actions(db: Db, actions: list[dict[str, Any]]) -> list[Any]:
    """Apply `[{"name": ..., "arguments": {...}}, ...]` to `db` in order; return the results.

    A call that raises does not stop the replay: its result is an `ActionFailed` (and, as
    every action checks before it changes anything, it left `db` unchanged). Results are
    snapshots, not live parts of `db`.
    """
    results: list[Any] = []
    for action in actions:
        name = action.get("name", "")
        try:
            fn = ACTIONS.get(name)
            if fn is None:
                raise LookupError(f"unknown action {name!r}")
            results.append(copy.deepcopy(fn(db, **(action.get("arguments") or {}))))
        except Exception as exc:
            results.append(ActionFailed(name, f"{type(exc).__name__}: {exc}"))
    return results


# -- the tether tools ------------------------------------------------------------------------


def db_path(ctx: ToolContext) -> Path:
    """The database file named by the run's data (`data.db`)."""
    path = ctx.data.get("db")
    if not isinstance(path, str) or not path:
        raise LookupError(
            "the run's data has no 'db' field: the workflow must set data.db to the path of the "
            "retail database file"
        )
    return Path(path)


def _read(ctx: ToolContext, name: str, **arguments: Any) -> Any:
    # Reads look at the shared snapshot (no 2.7 MB copy per read) and copy what they return.
    return copy.deepcopy(ACTIONS[name](retail_db.snapshot(db_path(ctx)), **arguments))


def _write(ctx: ToolContext, name: str, **arguments: Any) -> Any:
    return retail_db.update(db_path(ctx), lambda db: ACTIONS[name](db, **arguments))


def _on_disk(ctx: ToolContext) -> Db:
    # Verifiers read the file itself, not this process's cache of what it wrote.
    return retail_db.load(db_path(ctx), cached=False)


def _judged(problems: list[str], detail: dict[str, Any]) -> Evidence:
    if problems:
        return Evidence(ok=False, detail={**detail, "problems": problems})
    return Evidence(detail=detail)


def _expect(problems: list[str], what: str, actual: Any, expected: Any) -> None:
    if actual != expected:
        problems.append(f"{what} is {actual!r}, expected {expected!r}")


# Verifiers of the user lookups: the authenticated user becomes `facts.user_id`.


def _identified(user_id: Any, matches: Callable[[dict[str, Any]], bool], ctx: ToolContext) -> Evidence:
    user = _on_disk(ctx)["users"].get(user_id) if isinstance(user_id, str) else None
    if user is None or not matches(user):
        return Evidence(ok=False, detail={"user_id": user_id, "problem": "no such user matches on disk"})
    known = ctx.facts.get("user_id")
    if known is not None and known != user_id:
        return Evidence(
            ok=False,
            detail={
                "authenticated_user": known,
                "found_user": user_id,
                "problem": "only one user per conversation; another user is already authenticated",
            },
        )
    return Evidence(detail={"user_id": user_id}, facts={"user_id": user_id})


def verify_user_by_email(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """The user found has this email on disk; establish `facts.user_id`."""
    return _identified(result, lambda u: _fold(u["email"]) == _fold(args["email"]), ctx)


def verify_user_by_name_zip(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """The user found has this name and zip code on disk; establish `facts.user_id`."""

    def matches(user: dict[str, Any]) -> bool:
        name = user["name"]
        return (
            _fold(name["first_name"]) == _fold(args["first_name"])
            and _fold(name["last_name"]) == _fold(args["last_name"])
            and user["address"]["zip"] == args["zip"].strip()
        )

    return _identified(result, matches, ctx)


# Verifiers of the writes: each re-reads the file and checks the effect is there.


def _disk_order(ctx: ToolContext, order_id: str) -> dict[str, Any] | None:
    return _on_disk(ctx)["orders"].get(order_id)


def _missing(kind: str, key: str) -> Evidence:
    return Evidence(ok=False, detail={kind: key, "problems": [f"{kind} {key} not found on disk"]})


def verify_cancelled(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """The order is cancelled with the reason given and fully refunded."""
    order = _disk_order(ctx, args["order_id"])
    if order is None:
        return _missing("order_id", args["order_id"])
    problems: list[str] = []
    _expect(problems, "status", order["status"], "cancelled")
    _expect(problems, "cancel_reason", order.get("cancel_reason"), args["reason"])
    _expect(problems, "amount still paid", _net_paid(order), {})
    refunded = _cents(sum(t["amount"] for t in order["payment_history"] if t["transaction_type"] == "refund"))
    detail = {"order_id": args["order_id"], "status": order["status"], "refunded": refunded}
    return _judged(problems, detail)


def verify_items_modified(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """The order holds the new items, at catalogue prices, and is marked as modified."""
    db = _on_disk(ctx)
    order = db["orders"].get(args["order_id"])
    if order is None:
        return _missing("order_id", args["order_id"])
    problems: list[str] = []
    _expect(problems, "status", order["status"], ITEMS_MODIFIED)
    held = Counter(item["item_id"] for item in order["items"])
    for item_id, count in Counter(args["new_item_ids"]).items():
        if held[item_id] < count:
            problems.append(f"new item {item_id} is in the order {held[item_id]} time(s), expected {count}")
    for item in order["items"]:
        if item["item_id"] in args["new_item_ids"]:
            variant = db["products"].get(item["product_id"], {}).get("variants", {}).get(item["item_id"])
            if variant is None or item["price"] != variant["price"] or item["options"] != variant["options"]:
                problems.append(f"item {item['item_id']} does not carry its catalogue price and options")
    detail = {"order_id": args["order_id"], "status": order["status"], "items": sorted(held.elements())}
    return _judged(problems, detail)


def verify_order_address(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """The order ships to the new address."""
    order = _disk_order(ctx, args["order_id"])
    if order is None:
        return _missing("order_id", args["order_id"])
    problems: list[str] = []
    fields = {k: args[k] for k in ("address1", "address2", "city", "state", "country", "zip")}
    _expect(problems, "address", order["address"], _address(**fields))
    return _judged(problems, {"order_id": args["order_id"], "address": order["address"]})


def verify_order_payment(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """The new payment method pays the order and the original one is refunded."""
    order = _disk_order(ctx, args["order_id"])
    if order is None:
        return _missing("order_id", args["order_id"])
    problems: list[str] = []
    paid = _net_paid(order)
    _expect(problems, "payment methods that paid", sorted(paid), [args["payment_method_id"]])
    return _judged(problems, {"order_id": args["order_id"], "paid": paid})


def verify_user_address(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """The user's default address is the new one."""
    user = _on_disk(ctx)["users"].get(args["user_id"])
    if user is None:
        return _missing("user_id", args["user_id"])
    problems: list[str] = []
    fields = {k: args[k] for k in ("address1", "address2", "city", "state", "country", "zip")}
    _expect(problems, "address", user["address"], _address(**fields))
    return _judged(problems, {"user_id": args["user_id"], "address": user["address"]})


def verify_return_requested(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """The order is marked 'return requested' for these items, refunded to this method."""
    order = _disk_order(ctx, args["order_id"])
    if order is None:
        return _missing("order_id", args["order_id"])
    problems: list[str] = []
    _expect(problems, "status", order["status"], "return requested")
    _expect(problems, "return_items", order.get("return_items"), sorted(args["item_ids"]))
    _expect(
        problems, "return_payment_method_id", order.get("return_payment_method_id"), args["payment_method_id"]
    )
    return _judged(problems, {"order_id": args["order_id"], "status": order["status"]})


def verify_exchange_requested(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """The order is marked 'exchange requested' for these items, settled with this method."""
    order = _disk_order(ctx, args["order_id"])
    if order is None:
        return _missing("order_id", args["order_id"])
    problems: list[str] = []
    _expect(problems, "status", order["status"], "exchange requested")
    _expect(problems, "exchange_items", order.get("exchange_items"), sorted(args["item_ids"]))
    _expect(problems, "exchange_new_items", order.get("exchange_new_items"), sorted(args["new_item_ids"]))
    _expect(
        problems,
        "exchange_payment_method_id",
        order.get("exchange_payment_method_id"),
        args["payment_method_id"],
    )
    detail = {
        "order_id": args["order_id"],
        "status": order["status"],
        "price_difference": order.get("exchange_price_difference"),
    }
    return _judged(problems, detail)


@tool(effect="read", verify=verify_user_by_email)
def find_user_id_by_email(email: str, ctx: ToolContext) -> str:
    """Find a customer's user id by their email address, such as 'something@example.com'. Use this first to
    authenticate the customer, even if they already gave a user id; if they cannot remember their email,
    use find_user_id_by_name_zip.
    """
    return _read(ctx, "find_user_id_by_email", email=email)


@tool(effect="read", verify=verify_user_by_name_zip)
def find_user_id_by_name_zip(first_name: str, last_name: str, zip: str, ctx: ToolContext) -> str:
    """Find a customer's user id by first name, last name and zip code (such as 'John', 'Doe', '12345').
    Use this to authenticate the customer only when they cannot give an email that find_user_id_by_email
    recognizes.
    """
    return _read(ctx, "find_user_id_by_name_zip", first_name=first_name, last_name=last_name, zip=zip)


@tool(effect="read")
def get_user_details(user_id: str, ctx: ToolContext) -> dict[str, Any]:
    """Get a user's profile: name, email, default address, payment methods (with gift card balances) and
    the ids of their orders. A user id looks like 'sara_doe_496'.
    """
    return _read(ctx, "get_user_details", user_id=user_id)


@tool(effect="read")
def get_order_details(order_id: str, ctx: ToolContext) -> dict[str, Any]:
    """Get an order's status and details: its user, shipping address, items (with item ids, product ids,
    options and prices), fulfillments and payment history. Order ids start with '#', such as
    '#W0000000'.
    """
    return _read(ctx, "get_order_details", order_id=order_id)


@tool(effect="read")
def get_product_details(product_id: str, ctx: ToolContext) -> dict[str, Any]:
    """Get a product type and all its variant items: each item's id, options, availability and price.
    Product ids and item ids are both 10-digit numbers but never interchangeable: find a product id in an
    order's items or with list_all_product_types.
    """
    return _read(ctx, "get_product_details", product_id=product_id)


@tool(effect="read")
def get_item_details(item_id: str, ctx: ToolContext) -> dict[str, Any]:
    """Get one variant item by its item id (a 10-digit number, not a product id): its options,
    availability and price.
    """
    return _read(ctx, "get_item_details", item_id=item_id)


@tool(effect="read")
def list_all_product_types(ctx: ToolContext) -> str:
    """List every product type the store sells, as a JSON object mapping product name to product id, sorted
    by name. Use get_product_details to see a product's items.
    """
    return _read(ctx, "list_all_product_types")


@tool(effect="read")
def calculate(expression: str, ctx: ToolContext) -> str:
    """Calculate an arithmetic expression such as '(12.5 + 7) * 2 - 3 / 4', made of numbers, + - * /,
    parentheses and spaces; the result is rounded to 2 decimals.
    """
    return _calculate(None, expression)


@tool(effect="write", verify=verify_cancelled)
def cancel_pending_order(order_id: str, reason: str, ctx: ToolContext) -> dict[str, Any]:
    """Cancel a pending order, for the reason 'no longer needed' or 'ordered by mistake'; orders already
    processed or delivered cannot be cancelled. Explain the details and get the user's explicit
    confirmation (yes) first. What was paid is refunded: to a gift card immediately, otherwise within 5
    to 7 business days. Returns the order after cancellation.
    """
    return _write(ctx, "cancel_pending_order", order_id=order_id, reason=reason)


@tool(effect="write", verify=verify_items_modified)
def modify_pending_order_items(
    order_id: str, item_ids: ItemIds, new_item_ids: ItemIds, payment_method_id: str, ctx: ToolContext
) -> dict[str, Any]:
    """Change items of a pending order into other available options of the same products: new_item_ids[i]
    replaces item_ids[i] (an item id may repeat), and the price difference is paid with, or refunded to,
    payment_method_id (a gift card must cover it). This can be done only once per order, after which the
    order can no longer be cancelled or have its items modified, so collect every item first and get the
    user's explicit confirmation (yes). Returns the modified order.
    """
    return _write(
        ctx,
        "modify_pending_order_items",
        order_id=order_id,
        item_ids=item_ids,
        new_item_ids=new_item_ids,
        payment_method_id=payment_method_id,
    )


@tool(effect="write", verify=verify_order_address)
def modify_pending_order_address(
    order_id: str,
    address1: str,
    address2: str,
    city: str,
    state: str,
    country: str,
    zip: str,
    ctx: ToolContext,
) -> dict[str, Any]:
    """Change the shipping address of a pending order (address2 may be ''). Explain the change and get the
    user's explicit confirmation (yes) first. Returns the modified order.
    """
    return _write(
        ctx,
        "modify_pending_order_address",
        order_id=order_id,
        address1=address1,
        address2=address2,
        city=city,
        state=state,
        country=country,
        zip=zip,
    )


@tool(effect="write", verify=verify_order_payment)
def modify_pending_order_payment(order_id: str, payment_method_id: str, ctx: ToolContext) -> dict[str, Any]:
    """Pay a pending order with a different one of the user's payment methods; a gift card must cover the
    whole amount. The original method is refunded: a gift card immediately, otherwise within 5 to 7
    business days. Get the user's explicit confirmation (yes) first. Returns the modified order.
    """
    return _write(ctx, "modify_pending_order_payment", order_id=order_id, payment_method_id=payment_method_id)


@tool(effect="write", verify=verify_user_address)
def modify_user_address(
    user_id: str,
    address1: str,
    address2: str,
    city: str,
    state: str,
    country: str,
    zip: str,
    ctx: ToolContext,
) -> dict[str, Any]:
    """Change a user's default address (address2 may be ''); existing orders keep their shipping address.
    Explain the change and get the user's explicit confirmation (yes) first. Returns the user's profile.
    """
    return _write(
        ctx,
        "modify_user_address",
        user_id=user_id,
        address1=address1,
        address2=address2,
        city=city,
        state=state,
        country=country,
        zip=zip,
    )


@tool(effect="write", verify=verify_return_requested)
def return_delivered_order_items(
    order_id: str, item_ids: ItemIds, payment_method_id: str, ctx: ToolContext
) -> dict[str, Any]:
    """Request the return of items of a delivered order (an item id may repeat); the refund goes to
    payment_method_id, which must be the order's original payment method or a gift card. The order
    becomes 'return requested' and the user is emailed how to return the items. Get the user's explicit
    confirmation (yes) first. Returns the order.
    """
    return _write(
        ctx,
        "return_delivered_order_items",
        order_id=order_id,
        item_ids=item_ids,
        payment_method_id=payment_method_id,
    )


@tool(effect="write", verify=verify_exchange_requested)
def exchange_delivered_order_items(
    order_id: str, item_ids: ItemIds, new_item_ids: ItemIds, payment_method_id: str, ctx: ToolContext
) -> dict[str, Any]:
    """Request an exchange of items of a delivered order for other available options of the same products:
    new_item_ids[i] replaces item_ids[i] (an item id may repeat), and the price difference is paid with,
    or refunded to, payment_method_id (a gift card must cover it). This can be done only once per order,
    so collect every item first and get the user's explicit confirmation (yes). The order becomes
    'exchange requested'; no new order is needed. Returns the order.
    """
    return _write(
        ctx,
        "exchange_delivered_order_items",
        order_id=order_id,
        item_ids=item_ids,
        new_item_ids=new_item_ids,
        payment_method_id=payment_method_id,
    )


@tool(effect="external", idempotent=True)
def transfer_to_human_agents(summary: str, ctx: ToolContext) -> str:
    """Transfer the user to a human agent, with a summary of their issue. Transfer only if the user
    explicitly asks for a human, or if their request cannot be handled with the available tools under
    the policy.
    """
    return _transfer_to_human_agents(None, summary)


TOOLS = (
    find_user_id_by_email,
    find_user_id_by_name_zip,
    get_user_details,
    get_order_details,
    get_product_details,
    get_item_details,
    list_all_product_types,
    calculate,
    cancel_pending_order,
    modify_pending_order_items,
    modify_pending_order_address,
    modify_pending_order_payment,
    modify_user_address,
    return_delivered_order_items,
    exchange_delivered_order_items,
    transfer_to_human_agents,
)
"""Every retail tool: the eight reads, the seven writes, then the transfer."""
