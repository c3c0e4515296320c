"""Tools of the airline example: a small airline's reservations in a JSON file (`data.db`).

Reads load the file; writes load it, change it and write it back (one process at a time:
this example has no file lock, unlike the retail one). The policy (policy.yaml), not these
functions, decides which calls are allowed: like tau2-bench's airline API, the writes check
only that what they name exists. Arguments with structure are declared as `TypedDict`s (a
`typing.TypedDict` works on every supported Python).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypedDict

from tether import Evidence, ToolContext, tool

Cabin = Literal["basic_economy", "economy", "business"]


class FlightInfo(TypedDict):
    """One leg of a trip: a flight on a date."""

    flight_number: str
    date: str  # YYYY-MM-DD


class Passenger(TypedDict):
    first_name: str
    last_name: str
    dob: str  # YYYY-MM-DD


class Payment(TypedDict):
    payment_id: str
    amount: int


def _path(ctx: ToolContext) -> Path:
    return Path(str(ctx.data["db"]))


def _load(ctx: ToolContext) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_path(ctx).read_text())
    return data


def _save(ctx: ToolContext, db: dict[str, Any]) -> None:
    path = _path(ctx)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(db, indent=1))
    temporary.replace(path)


def _reservation(db: dict[str, Any], reservation_id: str) -> dict[str, Any]:
    found = db["reservations"].get(reservation_id)
    if found is None:
        raise LookupError(f"no reservation {reservation_id!r}")
    return dict(found)


def _reservation_on_disk(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """A write's verifier: the reservation it returned is the one on disk now."""
    reservation_id = result.get("reservation_id") if isinstance(result, dict) else None
    stored = _load(ctx)["reservations"].get(reservation_id)
    return Evidence(ok=stored == result, detail={"reservation_id": reservation_id})


def _certificate_on_disk(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """send_certificate's verifier: the user holds a certificate of that amount."""
    user = _load(ctx)["users"].get(args["user_id"]) or {}
    held = [m for m in user.get("payment_methods", {}).values() if m.get("source") == "certificate"]
    found = any(m.get("amount") == args["amount"] for m in held)
    return Evidence(ok=found, detail={"certificates": len(held)})


# -- reads ----------------------------------------------------------------------------------------


@tool(effect="read")
def get_user_details(user_id: str, ctx: ToolContext) -> dict[str, Any]:
    """The user's profile: name, membership, payment methods, reservation ids."""
    user = _load(ctx)["users"].get(user_id)
    if user is None:
        raise LookupError(f"no user {user_id!r}")
    return dict(user)


@tool(effect="read")
def get_reservation_details(reservation_id: str, ctx: ToolContext) -> dict[str, Any]:
    """A reservation: flights, passengers, cabin, payments, baggage, insurance."""
    return _reservation(_load(ctx), reservation_id)


@tool(effect="read")
def get_flight_status(flight_number: str, date: str, ctx: ToolContext) -> str:
    """The status of a flight on a date (available, delayed, on time, flying, landed, cancelled)."""
    flight = _load(ctx)["flights"].get(flight_number)
    if flight is None or date not in flight["dates"]:
        raise LookupError(f"no flight {flight_number!r} on {date}")
    return str(flight["dates"][date]["status"])


# -- writes ---------------------------------------------------------------------------------------


@tool(effect="write", verify=_reservation_on_disk)
def book_reservation(
    user_id: str,
    origin: str,
    destination: str,
    flight_type: Literal["one_way", "round_trip"],
    cabin: Cabin,
    flights: list[FlightInfo],
    passengers: list[Passenger],
    payment_methods: list[Payment],
    total_baggages: int,
    nonfree_baggages: int,
    insurance: Literal["yes", "no"],
    ctx: ToolContext,
) -> dict[str, Any]:
    """Book a reservation for the user."""
    db = _load(ctx)
    if user_id not in db["users"]:
        raise LookupError(f"no user {user_id!r}")
    reservation_id = f"R{len(db['reservations']) + 1:05d}"
    reservation = {
        "reservation_id": reservation_id,
        "user_id": user_id,
        "origin": origin,
        "destination": destination,
        "flight_type": flight_type,
        "cabin": cabin,
        "flights": [dict(f) for f in flights],
        "passengers": [dict(p) for p in passengers],
        "payment_history": [dict(p) for p in payment_methods],
        "created_at": ctx.data.get("booked_at", ""),
        "total_baggages": total_baggages,
        "nonfree_baggages": nonfree_baggages,
        "insurance": insurance,
    }
    db["reservations"][reservation_id] = reservation
    db["users"][user_id]["reservations"].append(reservation_id)
    _save(ctx, db)
    return reservation


@tool(effect="write", verify=_reservation_on_disk)
def cancel_reservation(reservation_id: str, ctx: ToolContext) -> dict[str, Any]:
    """Cancel the whole reservation; the refund goes to the original payment methods."""
    db = _load(ctx)
    reservation = _reservation(db, reservation_id)
    reservation["status"] = "cancelled"
    db["reservations"][reservation_id] = reservation
    _save(ctx, db)
    return reservation


@tool(effect="write", verify=_reservation_on_disk)
def update_reservation_flights(
    reservation_id: str, cabin: Cabin, flights: list[FlightInfo], payment_id: str, ctx: ToolContext
) -> dict[str, Any]:
    """Change the reservation's flights and/or cabin (the cabin applies to every flight)."""
    db = _load(ctx)
    reservation = _reservation(db, reservation_id)
    kept = {(f["flight_number"], f["date"]): f for f in reservation["flights"]}
    reservation["cabin"] = cabin
    reservation["flights"] = [kept.get((f["flight_number"], f["date"]), dict(f)) for f in flights]
    db["reservations"][reservation_id] = reservation
    _save(ctx, db)
    return reservation


@tool(effect="write", verify=_reservation_on_disk)
def update_reservation_baggages(
    reservation_id: str, total_baggages: int, nonfree_baggages: int, payment_id: str, ctx: ToolContext
) -> dict[str, Any]:
    """Set the reservation's checked bags: how many in all, how many paid (50 dollars each)."""
    db = _load(ctx)
    reservation = _reservation(db, reservation_id)
    reservation["total_baggages"], reservation["nonfree_baggages"] = total_baggages, nonfree_baggages
    db["reservations"][reservation_id] = reservation
    _save(ctx, db)
    return reservation


@tool(effect="write", verify=_reservation_on_disk)
def update_reservation_passengers(
    reservation_id: str, passengers: list[Passenger], ctx: ToolContext
) -> dict[str, Any]:
    """Replace the reservation's passengers' details."""
    db = _load(ctx)
    reservation = _reservation(db, reservation_id)
    reservation["passengers"] = [dict(p) for p in passengers]
    db["reservations"][reservation_id] = reservation
    _save(ctx, db)
    return reservation


@tool(effect="write", verify=_certificate_on_disk)
def send_certificate(user_id: str, amount: int, ctx: ToolContext) -> str:
    """Add a travel certificate of `amount` dollars to the user's payment methods."""
    db = _load(ctx)
    user = db["users"].get(user_id)
    if user is None:
        raise LookupError(f"no user {user_id!r}")
    certificate_id = f"certificate_{len(user['payment_methods']) + 1:04d}"
    certificate = {"source": "certificate", "id": certificate_id, "amount": amount}
    user["payment_methods"][certificate_id] = certificate
    _save(ctx, db)
    return f"certificate {certificate_id} of {amount} dollars added for {user_id}"


@tool(effect="read")
def transfer_to_human_agents(summary: str) -> str:
    """Transfer the user to a human agent, with a summary of their issue."""
    return "Transfer successful"
