"""The JSON API under `/api/v1`: runs, their timelines and live events, tickets and decisions.

Every endpoint is one `Endpoint` declaration: method, path, the action it needs (checked by
`tether.identity.authorize` against the caller's token), its query parameters, request and
response types (msgspec structs). The routes and the OpenAPI document (`/openapi.json`) are
both generated from these declarations, so the document cannot drift from what is served.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import msgspec
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tether import identity
from tether.errors import RunNotFound, TicketError
from tether.hashing import encode_json, sha256_hex
from tether.identity import Principal
from tether.journal import Journal, RunRecord, RunStatus, Ticket, verify_chain
from tether.journal.common import SELF_DRIVEN
from tether.operations import Operations, Outcome, actionable
from tether.registry import NotRegistered, Registry
from tether.runtime import Runtime
from tether.serve.events import EventHub
from tether.serve.problems import MEDIA_TYPE, Problem
from tether.timeline import timeline
from tether.workflow import Workflow

PREFIX = "/api/v1"
STATUSES: tuple[str, ...] = get_args(RunStatus)
MAX_BODY = 1 << 20  # a request body larger than this is refused before it is read whole


# -- what goes in and out ------------------------------------------------------------------


class _In(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A request body: unknown fields are refused, not ignored."""


class StartRun(_In):
    workflow: str
    version: str | None = None
    input: dict[str, Any] = {}


class Approve(_In):
    reason: str = ""
    # Edit-and-approve: the arguments to execute instead (schema, scope and policy again).
    args: dict[str, Any] | None = None


class Deny(_In):
    reason: str


class AnswerIn(_In):
    answer: str


class Cancel(_In):
    reason: str = ""
    rollback: bool = False


class Retry(_In):
    note: str = ""


class TakeOver(_In):
    exit: str
    data: dict[str, Any] = {}


class RunOut(msgspec.Struct, kw_only=True):
    run_id: str
    workflow: str
    workflow_version: str
    status: RunStatus
    state: str
    owner: str | None
    reason_code: str | None
    message: str | None
    ticket_id: str | None
    created_at: float
    updated_at: float
    last_seq: int


class RunPage(msgspec.Struct, kw_only=True):
    runs: list[RunOut]
    # Pass as `cursor` for the next page; null on the last page.
    next_cursor: str | None


class Chain(msgspec.Struct, kw_only=True):
    intact: bool
    problems: list[str]


class RunDetail(msgspec.Struct, kw_only=True):
    run: RunOut
    input: dict[str, Any]
    data: dict[str, Any]
    facts: dict[str, Any]
    # One row per journal entry: proposal → decision and rule → outcome → result (tether.timeline).
    steps: list[dict[str, Any]]
    chain: Chain


class TicketOut(msgspec.Struct, kw_only=True):
    ticket_id: str
    run_id: str
    workflow: str
    step_id: str
    kind: Literal["approval", "question"]
    subject: str
    args: dict[str, Any]
    args_hash: str
    approver: str
    question: str | None
    status: str
    created_at: float
    expires_at: float
    decided_at: float | None
    decided_by: str | None
    reason: str | None
    answer: str | None
    # What the caller may do with it: approve, deny, answer (empty: view only).
    actions: list[str]


class TicketList(msgspec.Struct, kw_only=True):
    tickets: list[TicketOut]


class Decided(msgspec.Struct, kw_only=True):
    ticket: TicketOut
    run: RunOut


class Operated(msgspec.Struct, kw_only=True):
    run: RunOut
    # A cancel with rollback: each effect undone (or not), newest first (tether.compensation).
    rollback: dict[str, Any] | None = None


class ActionableRun(msgspec.Struct, kw_only=True):
    run: RunOut
    # What a person may do about it: cancel, retry, take_over, resolve.
    actions: list[str]


class ActionableList(msgspec.Struct, kw_only=True):
    runs: list[ActionableRun]


class Me(msgspec.Struct, kw_only=True):
    principal_id: str
    name: str
    kind: str
    role: str
    approver_for: list[str]
    workflows: list[str]


class WorkflowOut(msgspec.Struct, kw_only=True):
    name: str
    version: str
    hash: str
    description: str | None
    start: str
    states: list[str]


class WorkflowList(msgspec.Struct, kw_only=True):
    workflows: list[WorkflowOut]


class ProblemOut(msgspec.Struct, kw_only=True):
    type: str
    title: str
    status: int
    detail: str
    code: str


# -- declarations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["query", "path", "header"]
    schema: dict[str, Any]
    description: str
    required: bool = False


@dataclass
class Server:
    """What the endpoints work with: the journal, the workflows, the live-event hub."""

    journal: Journal
    registry: Registry | None
    model_spec: str | None
    hub: EventHub
    runtime: Runtime = field(init=False)
    operations: Operations = field(init=False)

    def __post_init__(self) -> None:
        self.runtime = Runtime(self.journal)
        self.operations = Operations(self.journal, load=self.pinned_workflow)

    async def pinned_workflow(self, record: RunRecord) -> Workflow:
        """The workflow a run is pinned to, as this server loaded it from its roots (never
        from the path the journal names)."""
        if self.registry is None:
            raise Problem(
                409, "no_workflows", "this server was started without workflow folders (--workflows)"
            )
        try:
            return self.registry.workflow_for(record)
        except NotRegistered as exc:
            raise Problem(409, "workflow_not_loaded", str(exc)) from None


Handler = Callable[[Server, Request, Principal], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    params: tuple[Param, ...] = ()
    body: type[_In] | None = None
    response: type | None = None
    status: int = 200
    errors: tuple[int, ...] = (401, 403)
    stream: bool = False


def _ok(value: msgspec.Struct, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(value), status, headers, media_type="application/json")


async def _body(request: Request, kind: type[_In]) -> Any:
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise Problem(413, "too_large", f"the request body is larger than {MAX_BODY} bytes")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise Problem(413, "too_large", f"the request body is larger than {MAX_BODY} bytes")
    if not raw.strip():
        raw = b"{}"
    try:
        decoded = msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise Problem(422, "invalid_request", f"the request body is refused: {exc}") from None
    except msgspec.DecodeError as exc:
        raise Problem(422, "invalid_request", f"the request body is not JSON: {exc}") from None
    outside = _number_outside_range(msgspec.to_builtins(decoded))
    if outside is not None:
        raise Problem(
            422, "invalid_request", f"the number {outside:.6g} is outside the range a journal value may hold"
        )
    return decoded


# What a number in a journal value may be (a 64-bit integer's range; the document says so).
NUMBER_RANGE = (-(2**63), 2**64 - 1)


def _number_outside_range(value: Any) -> float | None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif (
            isinstance(item, int | float)
            and not isinstance(item, bool)
            and not NUMBER_RANGE[0] <= item <= NUMBER_RANGE[1]
        ):
            return float(item)
    return None


async def principal_of(journal: Journal, request: Request) -> Principal:
    """The caller, from `Authorization: Bearer TOKEN` (401 without a valid token)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(401, "unauthenticated", "send the API token as `Authorization: Bearer TOKEN`")
    return await identity.authenticate(journal, token.strip())


def run_out(record: RunRecord) -> RunOut:
    pending = record.checkpoint.get("pending") or {}
    return RunOut(
        run_id=record.run_id,
        workflow=record.workflow_name,
        workflow_version=record.workflow_version,
        status=record.status,
        state=record.state,
        owner=record.owner,
        reason_code=record.reason_code,
        message=record.message,
        ticket_id=pending.get("ticket_id") if record.status == "paused" else None,
        created_at=record.created_at,
        updated_at=record.updated_at,
        last_seq=record.last_seq,
    )


def ticket_out(ticket: Ticket, workflow: str, principal: Principal, record: RunRecord) -> TicketOut:
    actions: list[str] = []
    if ticket.status == "pending":
        action = "answer" if ticket.kind == "question" else "decide"
        if identity.allowed(principal, action, workflow=workflow, ticket=ticket, run=record):
            actions = ["answer", "deny"] if ticket.kind == "question" else ["approve", "deny"]
    return TicketOut(
        ticket_id=ticket.ticket_id,
        run_id=ticket.run_id,
        workflow=workflow,
        step_id=ticket.step_id,
        kind=ticket.kind,
        subject=ticket.subject,
        args=ticket.args,
        args_hash=ticket.args_hash,
        approver=ticket.approver,
        question=ticket.question,
        status=ticket.status,
        created_at=ticket.created_at,
        expires_at=ticket.expires_at,
        decided_at=ticket.decided_at,
        decided_by=ticket.decided_by,
        reason=ticket.reason,
        answer=ticket.answer,
        actions=actions,
    )


# -- runs -----------------------------------------------------------------------------------


def _time(request: Request, name: str) -> float | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise Problem(422, "invalid_request", f"{name}={value!r} is not an ISO 8601 date-time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


# A page's position: the (created_at, run_id) of the previous page's last run, in plain text.
CURSOR = r"^[0-9]{1,12}(\.[0-9]{1,9})?~[A-Za-z0-9_-]{1,64}$"


def _cursor(value: str | None) -> tuple[float, str] | None:
    if value is None:
        return None
    if not re.fullmatch(CURSOR, value):
        raise Problem(
            422, "invalid_request", "cursor is not one this API returned (pass next_cursor as given)"
        )
    created_at, _, run_id = value.partition("~")
    return float(created_at), run_id


def _limit(request: Request) -> int:
    value = request.query_params.get("limit", "50")
    if not value.isdigit() or not 1 <= int(value) <= 200:
        raise Problem(422, "invalid_request", f"limit={value!r}: give a whole number from 1 to 200")
    return int(value)


async def list_runs(server: Server, request: Request, principal: Principal) -> Response:
    q = request.query_params
    status, workflow = q.get("status"), q.get("workflow")
    if status is not None and status not in STATUSES:
        raise Problem(422, "invalid_request", f"status={status!r} is not one of {', '.join(STATUSES)}")
    identity.authorize(principal, "view", workflow=workflow)
    scoped = principal.workflows if workflow is None and principal.role != "admin" else ()
    limit = _limit(request)
    records = await server.journal.page_runs(
        status=status,
        workflow=workflow,
        workflows=scoped or None,
        owner=q.get("owner"),
        since=_time(request, "since"),
        until=_time(request, "until"),
        after=_cursor(q.get("cursor")),
        limit=limit,
    )
    last = records[-1] if len(records) == limit else None
    cursor = f"{last.created_at!r}~{last.run_id}" if last else None
    return _ok(RunPage(runs=[run_out(r) for r in records], next_cursor=cursor))


def idempotent_run_id(principal: Principal, key: str) -> str:
    """The run an Idempotency-Key names, for this caller: the same key, the same run."""
    return "run_" + sha256_hex(f"{principal.principal_id}\n{key}")[:16]


async def start_run(server: Server, request: Request, principal: Principal) -> Response:
    start = await _body(request, StartRun)
    identity.authorize(principal, "start", workflow=start.workflow)
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise Problem(422, "invalid_request", "Idempotency-Key must be 1 to 255 characters")
    if server.registry is None:
        raise Problem(409, "no_workflows", "this server was started without workflow folders (--workflows)")
    try:
        workflow = server.registry.named(start.workflow, start.version)
    except NotRegistered as exc:
        raise Problem(422, "unknown_workflow", str(exc)) from None
    run_id = idempotent_run_id(principal, key) if key is not None else None
    if run_id is not None:
        earlier = await _existing(server, run_id)
        if earlier is not None:
            return _replayed(earlier, start, workflow.version)
    try:
        result = await server.runtime.submit(
            workflow,
            input=start.input,
            workflow_ref=str(server.registry.folders[workflow.hash]),
            model_spec=server.model_spec,
            run_id=run_id,
            by=principal,
        )
    except Exception as exc:
        # Two requests with one key at once: the second finds the run the first created.
        earlier = await _existing(server, run_id) if run_id is not None else None
        if earlier is None:
            raise
        del exc
        return _replayed(earlier, start, workflow.version)
    record = await server.journal.get_run(result.run_id)
    return _ok(run_out(record), 201, {"Location": f"{PREFIX}/runs/{record.run_id}"})


async def _existing(server: Server, run_id: str) -> RunRecord | None:
    try:
        return await server.journal.get_run(run_id)
    except RunNotFound:
        return None


def _replayed(earlier: RunRecord, start: StartRun, version: str) -> Response:
    """The run an earlier request with this key started; 409 if that request said otherwise."""
    same = (
        earlier.workflow_name == start.workflow
        and (start.version is None or earlier.workflow_version == version)
        and encode_json(earlier.input) == encode_json(start.input)
    )
    if not same:
        raise Problem(
            409,
            "idempotency_conflict",
            f"this Idempotency-Key already started run {earlier.run_id} with another request body; "
            "use a new key for a new run",
            run_id=earlier.run_id,
        )
    return _ok(run_out(earlier), 200, {"Location": f"{PREFIX}/runs/{earlier.run_id}"})


async def _run(server: Server, request: Request, principal: Principal, action: str = "view") -> RunRecord:
    record = await server.journal.get_run(request.path_params["run_id"])
    identity.authorize(principal, action, workflow=record.workflow_name, run=record)
    return record


async def show_run(server: Server, request: Request, principal: Principal) -> Response:
    record = await _run(server, request, principal)
    entries = await server.journal.read_entries(record.run_id)
    problems = verify_chain(entries)
    detail = RunDetail(
        run=run_out(record),
        input=record.input,
        data=record.data,
        facts=record.facts,
        steps=timeline(entries),
        chain=Chain(intact=not problems, problems=problems),
    )
    return Response(encode_json(detail), media_type="application/json")


async def run_events(server: Server, request: Request, principal: Principal) -> Response:
    record = await _run(server, request, principal)
    header, query = request.headers.get("last-event-id"), request.query_params.get("after")
    for name, value in (("Last-Event-ID", header), ("after", query)):
        if value is not None and not re.fullmatch("[0-9]{1,18}", value):
            raise Problem(422, "invalid_request", f"{name} {value!r} is not an entry number")
    given = header if header is not None else query if query is not None else "0"
    return EventSourceResponse(server.hub.stream(record.run_id, int(given)), ping=15)


# -- tickets --------------------------------------------------------------------------------


async def list_tickets(server: Server, request: Request, principal: Principal) -> Response:
    status = request.query_params.get("status", "pending")
    if status not in ("pending", "all"):
        raise Problem(422, "invalid_request", f"status={status!r}: give pending or all")
    identity.authorize(principal, "view")
    tickets = await server.journal.list_tickets(None if status == "all" else "pending")
    runs = await server.journal.get_runs({t.run_id for t in tickets})
    shown: list[TicketOut] = []
    for ticket in tickets:
        record = runs[ticket.run_id]
        if identity.allowed(principal, "view", workflow=record.workflow_name, run=record):
            shown.append(ticket_out(ticket, record.workflow_name, principal, record))
    return _ok(TicketList(tickets=shown))


async def _decide(server: Server, request: Request, principal: Principal, verb: str) -> Response:
    kinds: dict[str, type[_In]] = {"approve": Approve, "deny": Deny, "answer": AnswerIn}
    kind = kinds[verb]
    given = await _body(request, kind)
    ticket_id = request.path_params["ticket_id"]
    try:
        ticket = await server.journal.get_ticket(ticket_id)
    except TicketError:
        raise Problem(404, "not_found", f"no ticket {ticket_id!r}") from None
    record = await server.journal.get_run(ticket.run_id)
    action = "answer" if ticket.kind == "question" else "decide"
    identity.authorize(principal, action, workflow=record.workflow_name, ticket=ticket, run=record)
    if verb == "approve" and ticket.kind == "question":
        raise Problem(409, "wrong_ticket_kind", f"ticket {ticket.ticket_id} is a question: answer it")
    if verb == "answer" and ticket.kind != "question":
        raise Problem(409, "wrong_ticket_kind", f"ticket {ticket.ticket_id} asks for approval, not an answer")
    decided = await decide(
        server,
        ticket,
        record,
        approve=verb != "deny",
        by=principal,
        reason=getattr(given, "reason", ""),
        answer=getattr(given, "answer", None),
        edited_args=getattr(given, "args", None),
    )
    record = await server.journal.get_run(ticket.run_id)
    server.hub.poke(record.run_id, record.last_seq, record.status)
    return _ok(
        Decided(ticket=ticket_out(decided, record.workflow_name, principal, record), run=run_out(record))
    )


async def decide(
    server: Server,
    ticket: Ticket,
    record: RunRecord,
    *,
    approve: bool,
    by: Principal,
    reason: str,
    answer: str | None,
    edited_args: dict[str, Any] | None,
) -> Ticket:
    """The kernel's one decision entry point (`Runtime.decide`); edited arguments are
    checked against the workflow the run is pinned to, as this server loaded it."""
    workflow = None
    # A run whose workflow lives in the process driving it: the kernel refuses the edit.
    if edited_args is not None and not record.workflow_ref.startswith(SELF_DRIVEN):
        if server.registry is None:
            raise Problem(409, "no_workflows", "checking edited arguments needs the server's --workflows")
        try:
            workflow = server.registry.workflow_for(record)
        except NotRegistered as exc:
            raise Problem(409, "workflow_not_loaded", str(exc)) from None
    return await server.runtime.decide(
        ticket.ticket_id,
        approve=approve,
        by=by,
        reason=reason,
        answer=answer,
        edited_args=edited_args,
        workflow=workflow,
    )


async def approve(server: Server, request: Request, principal: Principal) -> Response:
    return await _decide(server, request, principal, "approve")


async def deny(server: Server, request: Request, principal: Principal) -> Response:
    return await _decide(server, request, principal, "deny")


async def answer(server: Server, request: Request, principal: Principal) -> Response:
    return await _decide(server, request, principal, "answer")


# -- operations on runs (tether.operations) -------------------------------------------------


async def _operated(server: Server, outcome: Outcome) -> Response:
    record = await server.journal.get_run(outcome.run.run_id)
    server.hub.poke(record.run_id, record.last_seq, record.status)
    report = outcome.rollback.as_dict() if outcome.rollback is not None else None
    return Response(
        encode_json(Operated(run=run_out(record), rollback=report)), media_type="application/json"
    )


async def cancel(server: Server, request: Request, principal: Principal) -> Response:
    given = await _body(request, Cancel)
    record = await _run(server, request, principal, "cancel")
    outcome = await server.operations.cancel(record.run_id, principal, given.reason, rollback=given.rollback)
    return await _operated(server, outcome)


async def retry(server: Server, request: Request, principal: Principal) -> Response:
    given = await _body(request, Retry)
    record = await _run(server, request, principal, "retry")
    return await _operated(server, await server.operations.retry(record.run_id, principal, given.note))


async def take_over(server: Server, request: Request, principal: Principal) -> Response:
    given = await _body(request, TakeOver)
    record = await _run(server, request, principal, "take_over")
    outcome = await server.operations.take_over(record.run_id, principal, given.exit, given.data)
    return await _operated(server, outcome)


async def escalations(server: Server, request: Request, principal: Principal) -> Response:
    identity.authorize(principal, "view")
    waiting = await actionable(server.journal, owner=request.query_params.get("owner"), limit=_limit(request))
    shown = [
        ActionableRun(run=run_out(a.run), actions=list(a.actions))
        for a in waiting
        if identity.allowed(principal, "view", workflow=a.run.workflow_name, run=a.run)
    ]
    return _ok(ActionableList(runs=shown))


# -- who and what ---------------------------------------------------------------------------


async def whoami(server: Server, request: Request, principal: Principal) -> Response:
    return _ok(
        Me(
            principal_id=principal.principal_id,
            name=principal.name,
            kind=principal.kind,
            role=principal.role,
            approver_for=list(principal.approver_for),
            workflows=list(principal.workflows),
        )
    )


async def list_workflows(server: Server, request: Request, principal: Principal) -> Response:
    identity.authorize(principal, "view")
    found = server.registry.workflows.values() if server.registry else ()
    shown = [
        WorkflowOut(
            name=w.name,
            version=w.version,
            hash=w.hash,
            description=w.description or None,
            start=w.start,
            states=list(w.states),
        )
        for w in found
        if identity.allowed(principal, "view", workflow=w.name)
    ]
    return _ok(WorkflowList(workflows=shown))


# -- the table ------------------------------------------------------------------------------

_SEQ = {"type": "string", "pattern": "^[0-9]{1,18}$"}
# One server-sent event: `entry` (data: the entry's timeline row, JSON) or `end` (data: the status).
_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "event": {"enum": ["entry", "end"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["event", "data"],
}
_RUN_ID = Param("run_id", "path", {"type": "string"}, "The run's id.", required=True)
_TICKET_ID = Param("ticket_id", "path", {"type": "string"}, "The ticket's id.", required=True)
_RUN_FILTERS = (
    Param("status", "query", {"type": "string", "enum": list(STATUSES)}, "Only runs with this status."),
    Param("workflow", "query", {"type": "string"}, "Only runs of this workflow (by name)."),
    Param("owner", "query", {"type": "string"}, "Only runs owned by this principal or role."),
    Param("since", "query", {"type": "string", "format": "date-time"}, "Created at or after (ISO 8601)."),
    Param("until", "query", {"type": "string", "format": "date-time"}, "Created before (ISO 8601)."),
    Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 200}, "Page size (default 50)."),
    Param("cursor", "query", {"type": "string", "pattern": CURSOR}, "The next_cursor of the previous page."),
)

_OPERATION_ERRORS = (401, 403, 404, 409, 413, 422)
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/me", whoami, "The principal the token authenticates", response=Me),
    Endpoint(
        "POST",
        "/runs/{run_id}/cancel",
        cancel,
        "Cancel a run (withdrawing its ticket); with rollback, undo its effects first",
        params=(_RUN_ID,),
        body=Cancel,
        response=Operated,
        errors=_OPERATION_ERRORS,
    ),
    Endpoint(
        "POST",
        "/runs/{run_id}/retry",
        retry,
        "Retry the state an escalated, failed or stuck run stopped in, with a fresh budget",
        params=(_RUN_ID,),
        body=Retry,
        response=Operated,
        errors=_OPERATION_ERRORS,
    ),
    Endpoint(
        "POST",
        "/runs/{run_id}/take-over",
        take_over,
        "Choose an exit of the run's state, with data, in place of the model (checked by policy)",
        params=(_RUN_ID,),
        body=TakeOver,
        response=Operated,
        errors=_OPERATION_ERRORS,
    ),
    Endpoint(
        "GET",
        "/escalations",
        escalations,
        "Runs waiting for a person (escalated, effect in doubt, stuck) and what may be done",
        params=(
            Param("owner", "query", {"type": "string"}, "Only runs escalated to this role or principal."),
            Param(
                "limit", "query", {"type": "integer", "minimum": 1, "maximum": 200}, "At most (default 50)."
            ),
        ),
        response=ActionableList,
        errors=(401, 403, 422),
    ),
    Endpoint("GET", "/workflows", list_workflows, "Workflows this server can start", response=WorkflowList),
    Endpoint(
        "GET",
        "/runs",
        list_runs,
        "List runs, newest first",
        params=_RUN_FILTERS,
        response=RunPage,
        errors=(401, 403, 422),
    ),
    Endpoint(
        "POST",
        "/runs",
        start_run,
        "Start (queue) a run; Idempotency-Key: the same key and body give the same run",
        params=(
            Param(
                "Idempotency-Key",
                "header",
                {"type": "string", "minLength": 1, "maxLength": 255},
                "Retrying with the same key and body returns the run first started (200); "
                "another body with that key is a 409.",
            ),
        ),
        body=StartRun,
        response=RunOut,
        status=201,
        errors=(401, 403, 409, 413, 422),
    ),
    Endpoint(
        "GET",
        "/runs/{run_id}",
        show_run,
        "A run with its governed steps",
        params=(_RUN_ID,),
        response=RunDetail,
        errors=(401, 403, 404),
    ),
    Endpoint(
        "GET",
        "/runs/{run_id}/events",
        run_events,
        "The run's entries as server-sent events (id = entry seq; resumable with Last-Event-ID)",
        params=(
            _RUN_ID,
            Param("Last-Event-ID", "header", _SEQ, "Resume after this entry seq."),
            Param(
                "after",
                "query",
                _SEQ,
                "Resume after this entry seq (for clients without headers).",
            ),
        ),
        errors=(401, 403, 404, 422),
        stream=True,
    ),
    Endpoint(
        "GET",
        "/tickets",
        list_tickets,
        "Tickets the caller may see, with the actions it may take on each",
        params=(
            Param(
                "status", "query", {"type": "string", "enum": ["pending", "all"]}, "pending (default) or all."
            ),
        ),
        response=TicketList,
        errors=(401, 403, 422),
    ),
    Endpoint(
        "POST",
        "/tickets/{ticket_id}/approve",
        approve,
        "Approve exactly the ticket's arguments, or edited ones (`args`: checked again)",
        params=(_TICKET_ID,),
        body=Approve,
        response=Decided,
        errors=(401, 403, 404, 409, 413, 422),
    ),
    Endpoint(
        "POST",
        "/tickets/{ticket_id}/deny",
        deny,
        "Deny the ticket; the model is told why",
        params=(_TICKET_ID,),
        body=Deny,
        response=Decided,
        errors=(401, 403, 404, 409, 413, 422),
    ),
    Endpoint(
        "POST",
        "/tickets/{ticket_id}/answer",
        answer,
        "Answer a question a model asked",
        params=(_TICKET_ID,),
        body=AnswerIn,
        response=Decided,
        errors=(401, 403, 404, 409, 413, 422),
    ),
)


def routes(server: Server) -> list[Route]:
    """Starlette routes for the declarations (one per path, its methods dispatched), each
    authenticating its caller first."""
    by_path: dict[str, dict[str, Endpoint]] = {}
    for e in ENDPOINTS:
        by_path.setdefault(e.path, {})[e.method] = e

    def bind(methods: dict[str, Endpoint]) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            endpoint = methods[request.method if request.method != "HEAD" else "GET"]
            principal = await principal_of(server.journal, request)
            return await endpoint.handler(server, request, principal)

        serve.__name__ = "_".join(e.handler.__name__ for e in methods.values())
        return serve

    return [Route(PREFIX + path, bind(methods), methods=list(methods)) for path, methods in by_path.items()]


def openapi(registry: Registry | None = None, extra: tuple[Endpoint, ...] = ()) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the declared endpoints; a run may be started of the
    workflows (and versions) `registry` holds, which the document lists."""
    endpoints = (*ENDPOINTS, *extra)
    types: list[Any] = [ProblemOut]
    types += [t for e in endpoints for t in (e.body, e.response) if t is not None]
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    known = registry.workflows.values() if registry is not None else ()
    # Free JSON values (a run's input, edited arguments, data) hold numbers within range.
    value = {"$ref": "#/components/schemas/JsonValue"}
    components["JsonValue"] = {
        "anyOf": [
            {"type": ["null", "boolean", "string"]},
            {"type": "number", "minimum": NUMBER_RANGE[0], "maximum": NUMBER_RANGE[1]},
            {"type": "array", "items": value},
            {"type": "object", "additionalProperties": value},
        ]
    }
    for name, field_name in (("StartRun", "input"), ("Approve", "args"), ("TakeOver", "data")):
        prop = components.get(name, {}).get("properties", {}).get(field_name)
        if prop is None:
            continue
        free = {"type": "object", "additionalProperties": value}
        if "anyOf" in prop:  # optional: the object or null
            prop["anyOf"] = [free if alt.get("type") == "object" else alt for alt in prop["anyOf"]]
        else:
            prop.update(free)
    start = components["StartRun"]["properties"]
    if known:  # without workflows the server starts nothing (409)
        start["workflow"]["enum"] = sorted({w.name for w in known})
        versions = sorted({w.version for w in known})
        start["version"] = {"anyOf": [{"enum": versions}, {"type": "null"}], "default": None}
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        operation: dict[str, Any] = {
            "operationId": e.handler.__name__,
            "summary": e.summary,
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required,
                    "description": p.description,
                    "schema": p.schema,
                }
                for p in e.params
            ],
            "responses": {},
        }
        if e.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{e.body.__name__}"}}
                },
            }
        if e.stream:
            success: dict[str, Any] = {
                "description": "An event per journal entry (`entry`), then `end` once the run finished.",
                "content": {"text/event-stream": {"schema": _EVENT}},
            }
        else:
            schema = {"$ref": f"#/components/schemas/{e.response.__name__}"} if e.response else {}
            success = {"description": "OK", "content": {"application/json": {"schema": schema}}}
        operation["responses"][str(e.status)] = success
        if e.path == "/runs" and e.method == "POST":
            operation["responses"]["200"] = {**success, "description": "The run this Idempotency-Key started"}
        problem = {"content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemOut"}}}}
        for status in e.errors:
            operation["responses"][str(status)] = {"description": _describe(status), **problem}
        paths.setdefault(PREFIX + e.path, {})[e.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tether",
            "version": "1",
            "description": "Governed runs, their journals and tickets.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _describe(status: int) -> str:
    return {
        401: "No token, or one unknown, expired or revoked",
        403: "The token's role or scope does not allow this",
        404: "No such run or ticket",
        409: "Conflicts with the current state (a ticket already decided, an Idempotency-Key reused)",
        413: "Request body too large",
        422: "The request is malformed or refused",
    }[status]


def openapi_route(document: dict[str, Any]) -> Route:
    async def serve(request: Request) -> Response:
        return JSONResponse(document)

    return Route("/openapi.json", serve, methods=["GET"])
