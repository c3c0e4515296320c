"""The retail example's tools: pure actions, the JSON database, the tether tools and verifiers,
and a replay of every tau2-bench retail task's ground-truth actions (when the data is present)."""

from __future__ import annotations

import asyncio
import copy
import fcntl
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tether import Evidence, Tool, ToolContext
from tether.timeline import timeline

RETAIL = Path(__file__).resolve().parents[1] / "examples" / "retail"
TAU2_RETAIL = RETAIL / "tau2"  # tau2-bench's retail data, vendored
if str(RETAIL) not in sys.path:
    sys.path.insert(0, str(RETAIL))

import retail_db  # noqa: E402
import retail_tools as rt  # noqa: E402

# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def db() -> dict[str, Any]:
    return json.loads((RETAIL / "db.json").read_text(encoding="utf-8"))


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    path = tmp_path / "retail.json"
    shutil.copyfile(RETAIL / "db.json", path)
    return path


def make_ctx(path: Path | None, facts: dict[str, Any] | None = None) -> ToolContext:
    data = {"db": str(path)} if path is not None else {}
    return ToolContext(run_id="run_t", step_id="s1", idempotency_key="k1", data=data, facts=facts or {})


def call(tool: Tool, ctx: ToolContext, **args: Any) -> Any:
    return asyncio.run(tool.call(tool.validate(args), ctx))


def verify(tool: Tool, ctx: ToolContext, result: Any, **args: Any) -> Evidence:
    evidence = asyncio.run(tool.verify(tool.validate(args).values, result, ctx))
    assert evidence is not None
    return evidence


def act(db: dict[str, Any], name: str, **args: Any) -> Any:
    return rt.ACTIONS[name](db, **args)


def gift_balance(db: dict[str, Any], user_id: str, method_id: str) -> float:
    return db["users"][user_id]["payment_methods"][method_id]["balance"]


def net_paid(order: dict[str, Any]) -> float:
    signed = (
        t["amount"] if t["transaction_type"] == "payment" else -t["amount"] for t in order["payment_history"]
    )
    return round(sum(signed), 2)


def order_total(order: dict[str, Any]) -> float:
    return round(sum(item["price"] for item in order["items"]), 2)


def assert_books_balance(db: dict[str, Any]) -> None:
    """What an order's payment history nets to is its items' total, or zero once cancelled."""
    for order in db["orders"].values():
        expected = 0.0 if order["status"] == "cancelled" else order_total(order)
        assert abs(net_paid(order) - expected) < 0.005, order["order_id"]


# -- our small database ------------------------------------------------------------------------


def test_small_db_covers_every_case(db: dict[str, Any]) -> None:
    assert len(db["users"]) == 4 and len(db["orders"]) == 8 and len(db["products"]) == 5
    assert {o["status"] for o in db["orders"].values()} == {"pending", "processed", "delivered", "cancelled"}
    sources = Counter(m["source"] for u in db["users"].values() for m in u["payment_methods"].values())
    assert set(sources) == {"credit_card", "paypal", "gift_card"}
    variants = [v for p in db["products"].values() for v in p["variants"].values()]
    assert any(not v["available"] for v in variants) and any(v["available"] for v in variants)
    for user_id, user in db["users"].items():
        assert user["user_id"] == user_id
        for order_id in user["orders"]:
            assert db["orders"][order_id]["user_id"] == user_id
    for order in db["orders"].values():
        assert order["order_id"] in db["users"][order["user_id"]]["orders"]
        for item in order["items"]:
            variant = db["products"][item["product_id"]]["variants"][item["item_id"]]
            assert (item["price"], item["options"]) == (variant["price"], variant["options"])
        for txn in order["payment_history"]:
            assert txn["payment_method_id"] in db["users"][order["user_id"]]["payment_methods"]
    assert_books_balance(db)


# -- reads ------------------------------------------------------------------------------------


def test_find_user(db: dict[str, Any]) -> None:
    assert act(db, "find_user_id_by_email", email="Maya.Okafor@Example.com") == "maya_okafor_3147"
    # Names match case- and accent-insensitively; the zip code must match exactly.
    found = act(db, "find_user_id_by_name_zip", first_name="ines", last_name="ALVAREZ", zip="78701")
    assert found == "ines_alvarez_2046"
    with pytest.raises(LookupError, match="no user with email"):
        act(db, "find_user_id_by_email", email="nobody@example.com")
    with pytest.raises(LookupError, match="zip code 78702"):
        act(db, "find_user_id_by_name_zip", first_name="Inés", last_name="Álvarez", zip="78702")


def test_get_details(db: dict[str, Any]) -> None:
    assert act(db, "get_user_details", user_id="tom_whitaker_9031")["orders"] == ["#W8102746", "#W9017364"]
    assert act(db, "get_order_details", order_id="#W5561902")["status"] == "pending"
    assert act(db, "get_product_details", product_id="4012738851")["name"] == "Desk Lamp"
    item = act(db, "get_item_details", item_id="7302918465")
    assert item == {
        "item_id": "7302918465",
        "options": {"color": "silver", "brightness": "low", "power source": "battery"},
        "available": False,
        "price": 79.99,
    }
    listed = json.loads(act(db, "list_all_product_types"))
    assert list(listed) == sorted(listed) and listed["Backpack"] == "5930174826"
    with pytest.raises(LookupError, match="start with '#'"):
        act(db, "get_order_details", order_id="W5561902")
    with pytest.raises(LookupError, match="product 7302918465 not found"):
        act(db, "get_product_details", product_id="7302918465")  # an item id, not a product id
    with pytest.raises(LookupError, match="user nobody_1 not found"):
        act(db, "get_user_details", user_id="nobody_1")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 + 2", "4.0"),
        ("155.33 - 147.05 + 268.77 - 235.13", "41.92"),
        ("(1 + 2) * -3 / 4", "-2.25"),
        ("10 / 3", "3.33"),
        ("-(.5)", "-0.5"),
    ],
)
def test_calculate(expression: str, expected: str) -> None:
    assert rt.ACTIONS["calculate"](None, expression=expression) == expected


@pytest.mark.parametrize(
    "expression",
    ["__import__('os')", "2 ** 10", "7 // 2", "7 % 2", "1 / 0", "", "()", "1e5", "(1", "1 +", "9" * 600],
)
def test_calculate_refuses(expression: str) -> None:
    with pytest.raises(ValueError):
        rt.ACTIONS["calculate"](None, expression=expression)


def test_calculate_tool_refuses_code() -> None:
    with pytest.raises(ValueError, match="invalid characters"):
        call(rt.calculate, make_ctx(None), expression="__import__('os').system('true')")
    assert call(rt.calculate, make_ctx(None), expression="3131.1 + 4777.75 + 367.38") == "8276.23"


# -- writes -------------------------------------------------------------------------------------


def test_cancel_refunds_credit_card_later_and_gift_card_now(db: dict[str, Any]) -> None:
    order = act(db, "cancel_pending_order", order_id="#W4829103", reason="no longer needed")
    assert order["status"] == "cancelled" and order["cancel_reason"] == "no longer needed"
    assert order["payment_history"][-1] == {
        "transaction_type": "refund",
        "amount": 114.49,
        "payment_method_id": "credit_card_4410927",
    }
    act(db, "cancel_pending_order", order_id="#W8102746", reason="ordered by mistake")
    assert gift_balance(db, "tom_whitaker_9031", "gift_card_5048211") == 232.25  # 10.00 + 222.25
    assert_books_balance(db)


def test_cancel_refusals_change_nothing(db: dict[str, Any]) -> None:
    before = copy.deepcopy(db)
    with pytest.raises(ValueError, match="order #W7310284 is not pending"):
        act(db, "cancel_pending_order", order_id="#W7310284", reason="no longer needed")
    with pytest.raises(ValueError, match="invalid cancellation reason"):
        act(db, "cancel_pending_order", order_id="#W4829103", reason="found it cheaper")
    with pytest.raises(LookupError, match="order #W0000000 not found"):
        act(db, "cancel_pending_order", order_id="#W0000000", reason="no longer needed")
    assert db == before


def test_modify_items_pays_difference_from_gift_card(db: dict[str, Any]) -> None:
    order = act(
        db,
        "modify_pending_order_items",
        order_id="#W4829103",
        item_ids=["5520193847", "2201938475"],
        new_item_ids=["6638201174", "6104827391"],
        payment_method_id="gift_card_6620184",
    )
    assert order["status"] == "pending (item modified)"
    assert [(i["item_id"], i["price"]) for i in order["items"]] == [
        ("6638201174", 104.25),
        ("6104827391", 31.2),
    ]
    assert order["items"][1]["options"] == {"capacity": "750ml", "material": "glass", "color": "green"}
    assert order["payment_history"][-1] == {
        "transaction_type": "payment",
        "amount": 20.96,  # (104.25 - 89.50) + (31.20 - 24.99)
        "payment_method_id": "gift_card_6620184",
    }
    assert gift_balance(db, "maya_okafor_3147", "gift_card_6620184") == 99.04
    assert_books_balance(db)
    with pytest.raises(ValueError, match="only once"):  # the status is no longer exactly 'pending'
        act(
            db,
            "modify_pending_order_items",
            order_id="#W4829103",
            item_ids=["6638201174"],
            new_item_ids=["5520193847"],
            payment_method_id="gift_card_6620184",
        )
    with pytest.raises(ValueError, match="not pending"):
        act(db, "cancel_pending_order", order_id="#W4829103", reason="no longer needed")


def test_modify_items_refunds_a_cheaper_choice_to_gift_card(db: dict[str, Any]) -> None:
    act(
        db,
        "modify_pending_order_items",
        order_id="#W8102746",
        item_ids=["8745102263", "6638201174"],
        new_item_ids=["4417729301", "5520193847"],  # +3.75, -14.75
        payment_method_id="gift_card_5048211",
    )
    assert db["orders"]["#W8102746"]["payment_history"][-1]["transaction_type"] == "refund"
    assert db["orders"]["#W8102746"]["payment_history"][-1]["amount"] == 11.0
    assert gift_balance(db, "tom_whitaker_9031", "gift_card_5048211") == 21.0
    assert_books_balance(db)


@pytest.mark.parametrize(
    ("item_ids", "new_item_ids", "method", "error", "match"),
    [
        (["5520193847"], ["7302918465"], "credit_card_4410927", ValueError, "not available"),
        (["5520193847"], ["8810293746"], "credit_card_4410927", ValueError, "is a Backpack, not a Desk Lamp"),
        (["5520193847"], ["1111111111"], "credit_card_4410927", LookupError, "item 1111111111 not found"),
        (["8810293746"], ["6473829105"], "credit_card_4410927", LookupError, "not in order"),
        (["5520193847"], ["5520193847"], "credit_card_4410927", ValueError, "same as the item"),
        (
            ["5520193847", "5520193847"],
            ["6638201174"] * 2,
            "credit_card_4410927",
            ValueError,
            "listed 2 times",
        ),
        (["5520193847"], [], "credit_card_4410927", ValueError, "1 item"),
        ([], [], "credit_card_4410927", ValueError, "no items"),
        (
            ["5520193847"],
            ["6638201174"],
            "paypal_3381920",
            LookupError,
            "payment method paypal_3381920 not found",
        ),
    ],
)
def test_modify_items_refusals(
    db: dict[str, Any], item_ids: list[str], new_item_ids: list[str], method: str, error: type, match: str
) -> None:
    before = copy.deepcopy(db)
    with pytest.raises(error, match=match):
        act(
            db,
            "modify_pending_order_items",
            order_id="#W4829103",
            item_ids=item_ids,
            new_item_ids=new_item_ids,
            payment_method_id=method,
        )
    assert db == before


def test_modify_items_needs_gift_card_balance(db: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="insufficient gift card balance"):
        act(
            db,
            "modify_pending_order_items",
            order_id="#W5561902",
            item_ids=["5582019374"],
            new_item_ids=["7719203846"],  # +100.49, the card holds 15.50
            payment_method_id="gift_card_1193827",
        )


def test_modify_address(db: dict[str, Any]) -> None:
    new = {
        "address1": "1 Pier Road",
        "address2": "",
        "city": "Salem",
        "state": "MA",
        "country": "USA",
        "zip": "01970",
    }
    assert act(db, "modify_pending_order_address", order_id="#W5561902", **new)["address"] == new
    with pytest.raises(ValueError, match="not pending"):
        act(db, "modify_pending_order_address", order_id="#W2093847", **new)  # processed
    user = act(db, "modify_user_address", user_id="lucas_brennan_8820", **new)
    assert user["address"] == new
    # As in tau2, an order whose items were modified may still change its address.
    act(
        db,
        "modify_pending_order_items",
        order_id="#W4829103",
        item_ids=["2201938475"],
        new_item_ids=["6104827391"],
        payment_method_id="credit_card_4410927",
    )
    assert act(db, "modify_pending_order_address", order_id="#W4829103", **new)["address"] == new


def test_modify_payment(db: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="insufficient gift card balance"):
        act(db, "modify_pending_order_payment", order_id="#W5561902", payment_method_id="gift_card_1193827")
    with pytest.raises(ValueError, match="already paid with"):
        act(db, "modify_pending_order_payment", order_id="#W4829103", payment_method_id="credit_card_4410927")
    order = act(
        db, "modify_pending_order_payment", order_id="#W4829103", payment_method_id="gift_card_6620184"
    )
    assert order["status"] == "pending"
    assert [(t["transaction_type"], t["payment_method_id"]) for t in order["payment_history"]] == [
        ("payment", "credit_card_4410927"),
        ("payment", "gift_card_6620184"),
        ("refund", "credit_card_4410927"),
    ]
    assert gift_balance(db, "maya_okafor_3147", "gift_card_6620184") == 5.51  # 120.00 - 114.49
    with pytest.raises(ValueError, match="exactly one payment"):
        act(db, "modify_pending_order_payment", order_id="#W4829103", payment_method_id="credit_card_4410927")
    assert_books_balance(db)


def test_payment_change_from_gift_card_then_cancel_refunds_once(db: dict[str, Any]) -> None:
    act(db, "modify_pending_order_payment", order_id="#W8102746", payment_method_id="credit_card_2290471")
    assert gift_balance(db, "tom_whitaker_9031", "gift_card_5048211") == 232.25
    order = act(db, "cancel_pending_order", order_id="#W8102746", reason="no longer needed")
    # Only what the credit card still pays is refunded; the gift card is not refunded twice.
    assert order["payment_history"][-1] == {
        "transaction_type": "refund",
        "amount": 222.25,
        "payment_method_id": "credit_card_2290471",
    }
    assert gift_balance(db, "tom_whitaker_9031", "gift_card_5048211") == 232.25
    assert_books_balance(db)


def test_return(db: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="original payment method"):
        act(
            db,
            "return_delivered_order_items",
            order_id="#W6648120",
            item_ids=["2201938475"],
            payment_method_id="paypal_8802731",
        )
    with pytest.raises(ValueError, match="not delivered"):
        act(
            db,
            "return_delivered_order_items",
            order_id="#W2093847",
            item_ids=["6104827391"],
            payment_method_id="gift_card_1193827",
        )
    order = act(
        db,
        "return_delivered_order_items",
        order_id="#W6648120",
        item_ids=["7719203846", "2201938475", "2201938475"],
        payment_method_id="credit_card_7739102",
    )
    assert order["status"] == "return requested"
    assert order["return_items"] == ["2201938475", "2201938475", "7719203846"]
    assert order["return_payment_method_id"] == "credit_card_7739102"
    # A gift card is always acceptable for the refund.
    act(
        db,
        "return_delivered_order_items",
        order_id="#W7310284",
        item_ids=["3390172845"],
        payment_method_id="gift_card_6620184",
    )
    assert db["orders"]["#W7310284"]["status"] == "return requested"
    assert_books_balance(db)


def test_exchange(db: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="listed 3 times"):
        act(
            db,
            "exchange_delivered_order_items",
            order_id="#W6648120",
            item_ids=["2201938475"] * 3,
            new_item_ids=["6104827391"] * 3,
            payment_method_id="credit_card_7739102",
        )
    with pytest.raises(ValueError, match="insufficient gift card balance"):
        act(
            db,
            "exchange_delivered_order_items",
            order_id="#W9017364",
            item_ids=["6473829105"],
            new_item_ids=["2938475610"],  # +14.30, the card holds 10.00
            payment_method_id="gift_card_5048211",
        )
    history = copy.deepcopy(db["orders"]["#W6648120"]["payment_history"])
    order = act(
        db,
        "exchange_delivered_order_items",
        order_id="#W6648120",
        item_ids=["2201938475", "2201938475"],
        new_item_ids=["6104827391", "6104827391"],
        payment_method_id="credit_card_7739102",
    )
    assert order["status"] == "exchange requested"
    assert order["exchange_items"] == ["2201938475", "2201938475"]
    assert order["exchange_new_items"] == ["6104827391", "6104827391"]
    assert order["exchange_payment_method_id"] == "credit_card_7739102"
    assert order["exchange_price_difference"] == 12.42  # 2 x (31.20 - 24.99)
    assert order["payment_history"] == history  # settled later, not now
    with pytest.raises(ValueError, match="not delivered"):  # once per order
        act(
            db,
            "exchange_delivered_order_items",
            order_id="#W6648120",
            item_ids=["7719203846"],
            new_item_ids=["5582019374"],
            payment_method_id="credit_card_7739102",
        )


def test_transfer_changes_nothing(db: dict[str, Any]) -> None:
    before = copy.deepcopy(db)
    assert (
        act(db, "transfer_to_human_agents", summary="wants a refund to another card") == "Transfer successful"
    )
    assert db == before


def test_apply_actions_captures_errors_and_snapshots(db: dict[str, Any]) -> None:
    results = rt.apply_actions(
        db,
        [
            {"name": "get_order_details", "arguments": {"order_id": "#W5561902"}},
            {"name": "cancel_pending_order", "arguments": {"order_id": "#W5561902", "reason": "bored"}},
            {
                "name": "cancel_pending_order",
                "arguments": {"order_id": "#W5561902", "reason": "ordered by mistake"},
            },
            {"name": "no_such_tool", "arguments": {}},
            {"name": "get_order_details", "arguments": {"order_ids": "#W5561902"}},
        ],
    )
    assert results[0]["status"] == "pending"  # a snapshot, not the now-cancelled order
    assert isinstance(results[1], rt.ActionFailed) and "invalid cancellation reason" in results[1].error
    assert results[2]["status"] == "cancelled"
    assert isinstance(results[3], rt.ActionFailed) and "unknown action" in results[3].error
    assert isinstance(results[4], rt.ActionFailed) and results[4].error.startswith("TypeError")
    assert db["orders"]["#W5561902"]["status"] == "cancelled"


# -- the tether tools ----------------------------------------------------------------------------

READS = {
    "find_user_id_by_email",
    "find_user_id_by_name_zip",
    "get_user_details",
    "get_order_details",
    "get_product_details",
    "get_item_details",
    "list_all_product_types",
    "calculate",
}


def test_tool_contracts() -> None:
    tools = {t.name: t for t in rt.TOOLS}
    assert set(tools) == set(rt.ACTIONS) == READS | rt.WRITE_ACTIONS | {"transfer_to_human_agents"}
    for name, tool in tools.items():
        assert getattr(rt, name) is tool
        assert tool.description, name
        assert "ctx" not in tool.json_schema().get("properties", {})
        if name in READS:
            assert (tool.effect, tool.idempotent) == ("read", True)
        elif name in rt.WRITE_ACTIONS:
            assert (tool.effect, tool.idempotent) == ("write", False)
            assert tool.verifier is not None, name
    assert (rt.transfer_to_human_agents.effect, rt.transfer_to_human_agents.idempotent) == ("external", True)
    assert rt.find_user_id_by_email.verifier is rt.verify_user_by_email
    assert rt.find_user_id_by_name_zip.verifier is rt.verify_user_by_name_zip
    schema = rt.modify_pending_order_items.json_schema()
    assert schema["required"] == ["order_id", "item_ids", "new_item_ids", "payment_method_id"]
    assert schema["properties"]["item_ids"] == {
        "items": {"type": "string"},
        "maxItems": rt.MAX_ITEMS_PER_ORDER,
        "title": "Item Ids",
        "type": "array",
    }


def test_tools_need_the_db_path() -> None:
    with pytest.raises(LookupError, match=r"data\.db"):
        call(rt.get_order_details, make_ctx(None), order_id="#W5561902")


def test_write_tool_saves_and_verifier_rereads_the_disk(db_file: Path) -> None:
    ctx = make_ctx(db_file)
    result = call(rt.cancel_pending_order, ctx, order_id="#W5561902", reason="no longer needed")
    assert result["status"] == "cancelled"
    on_disk = json.loads(db_file.read_text())
    assert on_disk["orders"]["#W5561902"]["status"] == "cancelled"
    evidence = verify(rt.cancel_pending_order, ctx, result, order_id="#W5561902", reason="no longer needed")
    assert evidence.ok and evidence.detail["refunded"] == 149.5
    # The verifier reads the file, not the return value nor this process's cache of it.
    shutil.copyfile(RETAIL / "db.json", db_file)
    evidence = verify(rt.cancel_pending_order, ctx, result, order_id="#W5561902", reason="no longer needed")
    assert not evidence.ok and "status is 'pending'" in evidence.detail["problems"][0]
    # A refused write leaves the file as it was.
    before = db_file.read_bytes()
    with pytest.raises(ValueError, match="not pending"):
        call(rt.cancel_pending_order, ctx, order_id="#W2093847", reason="no longer needed")
    assert db_file.read_bytes() == before


def test_every_write_verifier_sees_its_effect(db_file: Path) -> None:
    ctx = make_ctx(db_file)
    address = {
        "address1": "5 Oak St",
        "address2": "",
        "city": "Reno",
        "state": "NV",
        "country": "USA",
        "zip": "89501",
    }
    calls: list[tuple[Tool, dict[str, Any]]] = [
        (
            rt.modify_pending_order_items,
            {
                "order_id": "#W4829103",
                "item_ids": ["5520193847"],
                "new_item_ids": ["6638201174"],
                "payment_method_id": "credit_card_4410927",
            },
        ),
        (rt.modify_pending_order_address, {"order_id": "#W5561902", **address}),
        (
            rt.modify_pending_order_payment,
            {"order_id": "#W8102746", "payment_method_id": "credit_card_2290471"},
        ),
        (rt.modify_user_address, {"user_id": "tom_whitaker_9031", **address}),
        (
            rt.return_delivered_order_items,
            {"order_id": "#W9017364", "item_ids": ["6473829105"], "payment_method_id": "gift_card_5048211"},
        ),
        (
            rt.exchange_delivered_order_items,
            {
                "order_id": "#W6648120",
                "item_ids": ["2201938475"],
                "new_item_ids": ["6104827391"],
                "payment_method_id": "credit_card_7739102",
            },
        ),
    ]
    for tool, args in calls:
        # Before the write, the verifier finds no effect.
        assert not verify(tool, ctx, None, **args).ok, tool.name
        result = call(tool, ctx, **args)
        evidence = verify(tool, ctx, result, **args)
        assert evidence.ok, (tool.name, evidence)
    assert_books_balance(retail_db.load(db_file))


def test_user_lookup_establishes_the_one_user(db_file: Path) -> None:
    ctx = make_ctx(db_file)
    user_id = call(rt.find_user_id_by_email, ctx, email="tom.whitaker@example.com")
    evidence = verify(rt.find_user_id_by_email, ctx, user_id, email="tom.whitaker@example.com")
    assert evidence == Evidence(detail={"user_id": user_id}, facts={"user_id": "tom_whitaker_9031"})
    # The same user again is fine; another user in the same conversation is not.
    same = make_ctx(db_file, facts={"user_id": "tom_whitaker_9031"})
    args = {"first_name": "Tom", "last_name": "Whitaker", "zip": "43215"}
    assert verify(rt.find_user_id_by_name_zip, same, user_id, **args).ok
    other = call(rt.find_user_id_by_name_zip, same, first_name="Inés", last_name="Álvarez", zip="78701")
    evidence = verify(
        rt.find_user_id_by_name_zip, same, other, first_name="Inés", last_name="Álvarez", zip="78701"
    )
    assert not evidence.ok and evidence.facts == {}
    assert evidence.detail["authenticated_user"] == "tom_whitaker_9031"
    assert evidence.detail["found_user"] == "ines_alvarez_2046"
    # A result that does not match the arguments on disk is not evidence.
    assert not verify(rt.find_user_id_by_email, ctx, "ines_alvarez_2046", email="tom.whitaker@example.com").ok


# -- the database file -------------------------------------------------------------------------


def test_load_returns_private_copies_and_sees_replacements(db_file: Path) -> None:
    first = retail_db.load(db_file)
    first["orders"].clear()
    assert retail_db.load(db_file)["orders"], "a caller's mutation must not reach the cache"
    # Another writer replaces the file (as save does) or even rewrites it in place.
    data = json.loads(db_file.read_text())
    data["users"]["tom_whitaker_9031"]["email"] = "t@example.com"
    db_file.write_text(json.dumps(data))
    assert retail_db.load(db_file)["users"]["tom_whitaker_9031"]["email"] == "t@example.com"


def test_save_is_atomic_and_keeps_the_mode(db_file: Path) -> None:
    os.chmod(db_file, 0o640)
    data = retail_db.load(db_file)
    data["orders"]["#W5561902"]["status"] = "processed"
    retail_db.save(db_file, data)
    assert json.loads(db_file.read_text())["orders"]["#W5561902"]["status"] == "processed"
    assert db_file.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in db_file.parent.iterdir()) == ["retail.json"]
    before = db_file.read_bytes()
    with pytest.raises(TypeError):
        retail_db.save(db_file, {"not json": object()})
    assert db_file.read_bytes() == before


def test_save_failure_leaves_the_old_file(db_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = db_file.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(retail_db.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        retail_db.save(db_file, {"orders": {}})
    assert db_file.read_bytes() == before
    assert sorted(p.name for p in db_file.parent.iterdir()) == ["retail.json"]


def test_update_writes_nothing_when_the_action_fails(db_file: Path) -> None:
    before = db_file.read_bytes()

    def half_then_fail(db: dict[str, Any]) -> None:
        db["orders"].clear()
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        retail_db.update(db_file, half_then_fail)
    assert db_file.read_bytes() == before


def test_the_write_lock_is_exclusive(db_file: Path) -> None:
    with retail_db.locked(db_file):
        fd = os.open(retail_db.lock_path(db_file), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(retail_db.lock_path(db_file), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(fd)


def test_concurrent_processes_lose_no_update(tmp_path: Path) -> None:
    path = tmp_path / "counter.json"
    retail_db.save(path, {"n": 0})
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(RETAIL)!r})
        import retail_db

        def bump(db):
            db["n"] += 1

        for _ in range(25):
            retail_db.update({str(path)!r}, bump)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    assert retail_db.load(path, cached=False) == {"n": 100}


# -- tau2-bench's retail tasks -----------------------------------------------------------------

# Ground-truth writes that tau2's own tools refuse too (tau2's evaluator swallows the error
# and builds the expected database without them; see sierra-research/tau2-bench#499).
KNOWN_FAILING_WRITES = {
    # The order is pending, not delivered; the task's next action modifies its items instead.
    ("64", "exchange_delivered_order_items"): "is not delivered",
    # Price difference 21.10 (101.12 + 109.58 - 2 x 94.80); the only gift card holds 17.00.
    ("105", "exchange_delivered_order_items"): "insufficient gift card balance",
}


@pytest.fixture(scope="module")
def tau2() -> tuple[bytes, list[dict[str, Any]]]:
    db = json.loads((TAU2_RETAIL / "db.json").read_text(encoding="utf-8"))
    tasks = json.loads((TAU2_RETAIL / "tasks.json").read_text(encoding="utf-8"))
    return pickle.dumps(db), tasks


def test_tau2_ground_truth_arguments_match_the_tool_parameters(
    tau2: tuple[bytes, list[dict[str, Any]]],
) -> None:
    tools = {t.name: t for t in rt.TOOLS}
    for task in tau2[1]:
        for action in task["evaluation_criteria"]["actions"] or []:
            tool = tools[action["name"]]
            assert set(action["arguments"]) == set(tool.json_schema().get("properties", {})), action
            tool.validate(action["arguments"])  # strict types, as a model's call would be checked


def test_tau2_ground_truth_actions_apply(tau2: tuple[bytes, list[dict[str, Any]]]) -> None:
    blob, tasks = tau2
    assert len(tasks) == 114
    failing_writes: dict[tuple[str, str], str] = {}
    failing_reads = 0
    applied_writes = 0
    for task in tasks:
        db = pickle.loads(blob)  # a fresh deep copy per task
        actions = task["evaluation_criteria"]["actions"] or []
        results = rt.apply_actions(db, actions)
        for action, result in zip(actions, results, strict=True):
            failed = isinstance(result, rt.ActionFailed)
            if action["name"] in rt.WRITE_ACTIONS:
                applied_writes += not failed
                if failed:
                    failing_writes[(task["id"], action["name"])] = result.error
            else:
                failing_reads += failed
        assert_books_balance(db)
    unexpected = {k: v for k, v in failing_writes.items() if k not in KNOWN_FAILING_WRITES}
    assert not unexpected, f"ground-truth writes refused by our tools: {unexpected}"
    for key, fragment in KNOWN_FAILING_WRITES.items():
        assert fragment in failing_writes.get(key, ""), (key, failing_writes.get(key))
    # 16 reads fail too (wrong emails, names, order ids; a product id that is a docstring example).
    assert failing_reads == 16
    assert applied_writes == 174


# -- governed by the runtime ---------------------------------------------------------------------


def test_a_governed_run_authenticates_then_cancels(db_file: Path, tmp_path: Path) -> None:
    from tether import AgentState, Policy, Runtime, ScriptedModel, Terminal, Workflow, open_journal

    policy = Policy.from_dict(
        {
            "version": 1,
            "defaults": {"read": "allow", "write": "deny", "external": "deny", "exit": "allow"},
            "rules": [
                {"id": "authenticated-writes", "tool": "*", "when": "has(facts.user_id)", "decision": "allow"}
            ],
        }
    )
    serve = AgentState("serve", "Help the customer.", rt.TOOLS, {"done": "end"})
    workflow = Workflow("retail-test", "1", "serve", [serve, Terminal("end")], policy=policy)
    workflow.validate()
    cancel = {"order_id": "#W5561902", "reason": "ordered by mistake"}
    model = ScriptedModel(
        [
            {
                "kind": "tool_call",
                "tool": "cancel_pending_order",
                "args": cancel,
            },  # denied: nobody authenticated
            {
                "kind": "tool_call",
                "tool": "find_user_id_by_email",
                "args": {"email": "lucas.brennan@example.com"},
            },
            {"kind": "tool_call", "tool": "cancel_pending_order", "args": cancel},
            {"kind": "exit", "exit": "done"},
        ]
    )
    journal = open_journal(str(tmp_path / "journal.db"))
    try:
        result = asyncio.run(Runtime(journal).start(workflow, model, input={"db": str(db_file)}))
        record = asyncio.run(journal.get_run(result.run_id))
        entries = asyncio.run(journal.read_entries(result.run_id))
    finally:
        journal.close()
    assert result.status == "completed", result
    assert record.facts["user_id"] == "lucas_brennan_8820"
    outcomes = [
        (
            row["proposal"]["tool"],
            row["outcome"],
            None if row["outcome"] == "executed" else row["reason_code"],
        )
        for row in timeline(entries)
        if row["kind"] == "step" and (row["proposal"] or {}).get("kind") == "tool_call"
    ]
    assert outcomes == [
        ("cancel_pending_order", "refused", "policy_denied"),
        ("find_user_id_by_email", "executed", None),
        ("cancel_pending_order", "executed", None),
    ], outcomes
    order = retail_db.load(db_file, cached=False)["orders"]["#W5561902"]
    assert order["status"] == "cancelled" and order["cancel_reason"] == "ordered by mistake"
    assert [t["transaction_type"] for t in order["payment_history"]] == ["payment", "refund"]
