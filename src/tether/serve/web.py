"""The web interface of `tether serve`: server-rendered pages (Jinja2) made live with htmx.

Pages: sign in with an API token; the inbox of tickets the person may decide (approve, deny
with a reason, edit the arguments and approve, answer); the run list; a run's timeline,
updating live over server-sent events; the workflow drawn as a graph with the run's path
highlighted; the active policy with each rule's text.

Sessions: signing in checks the token (`tether.identity.authenticate`) and keeps it in a
signed cookie (HttpOnly, SameSite=Strict, Secure over HTTPS); every request authenticates
it again, so a revoked or expired token stops working at once. Every form carries the
session's CSRF token and every POST is refused without it. What a page offers follows
`tether.identity.authorize`: a viewer sees the inbox but no button to decide.

No JavaScript build step and no CDN: htmx and its SSE extension are vendored under
`static/` with their licenses.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args
from urllib.parse import quote, urlencode

import msgspec
import yaml
from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from tether.analysis.graph import run_path, svg
from tether.errors import AuthError, TetherError
from tether.identity import Principal, allowed, authenticate, authorize
from tether.journal import FINISHED, Entry, Journal, RunRecord, RunStatus, Ticket
from tether.journal import bodies as b
from tether.serve import api
from tether.serve.problems import Problem, problem_of
from tether.timeline import timeline
from tether.workflow import Workflow

SESSION_COOKIE = "tether_session"
SECRET_ENV = "TETHER_WEB_SECRET"
SESSION_SECONDS = 12 * 3600
PAGE_SIZE = 50
INBOX_PAGE_SIZE = 10
STATIC = Path(__file__).parent / "static"
STATUSES: tuple[str, ...] = get_args(RunStatus)


class Refusal(Exception):
    """A request the web refuses: its HTTP status and what to tell the person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Session:
    token: str | None
    csrf: str


class Sessions:
    """Signed session cookies: the API token and the session's CSRF token."""

    def __init__(self, secret: str) -> None:
        self._signer = URLSafeTimedSerializer(secret, salt="tether-web-session")

    def read(self, request: Request) -> Session | None:
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            data = self._signer.loads(raw, max_age=SESSION_SECONDS)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("c"), str):
            return None
        token = data.get("t")
        return Session(token if isinstance(token, str) else None, data["c"])

    def write(self, request: Request, response: Response, session: Session) -> None:
        """Set the cookie: Secure when the page was reached over HTTPS (behind a proxy, with
        uvicorn's --forwarded-allow-ips, as the proxy says)."""
        response.set_cookie(
            SESSION_COOKIE,
            self._signer.dumps({"t": session.token, "c": session.csrf}),
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("tether.serve", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["pretty"] = _pretty
    env.filters["short"] = _short
    env.globals["proposed"] = _proposed
    return env


def _when(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def _short(value: Any, size: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= size else text[: size - 1] + "…"


def _proposed(row: dict[str, Any]) -> str:
    """What an entry's proposal asked for, in one short line."""
    proposal = row.get("proposal")
    if isinstance(proposal, dict) and proposal.get("kind") == "tool_call":
        args = ", ".join(f"{k}={json.dumps(v)}" for k, v in (proposal.get("args") or {}).items())
        return f"{proposal.get('tool')}({_short(args, 80)})"
    if isinstance(proposal, dict):
        label = proposal.get("exit") or proposal.get("question") or proposal.get("to") or ""
        return f"{proposal.get('kind')} {_short(label, 80)}".strip()
    if proposal is not None:
        return f"unparseable: {_short(proposal, 80)}"
    return "deterministic step" if row.get("kind") == "step" else str(row.get("kind"))


def _rule_text(rule: Any) -> str:
    values = rule.model_dump(exclude_none=True, exclude_defaults=True)
    values = {"id": rule.id, **values, "decision": rule.decision}
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=100).strip()


class Web:
    """The pages. They work with the server the app was built around (`build_app`): its
    journal, its workflows (for graphs and policies) and its live-event hub."""

    def __init__(self, *, secret: str) -> None:
        self.sessions = Sessions(secret)
        self.env = _environment()

    # -- plumbing ----------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.home),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/inbox", self.inbox),
            Route("/tickets/{ticket_id}/{action}", self.decide_ticket, methods=["POST"]),
            Route("/runs", self.runs),
            Route("/runs/{run_id}", self.run),
            Route("/runs/{run_id}/events", self.run_events),
            Route("/runs/{run_id}/graph.svg", self.run_graph),
            Route("/runs/{run_id}/policy", self.run_policy),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ]

    def page(self, request: Request, template: str, code: int = 200, **values: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(request=request, **values)
        return HTMLResponse(html, status_code=code, headers=_PAGE_HEADERS)

    def refused(self, request: Request, exc: Refusal, who: Principal | None, csrf: str = "") -> HTMLResponse:
        return self.page(request, "error.html", exc.status, who=who, csrf=csrf, message=str(exc))

    async def who(self, request: Request) -> tuple[Principal, Session] | None:
        """The signed-in principal, authenticated again from the session's token."""
        session = self.sessions.read(request)
        if session is None or session.token is None:
            return None
        try:
            return await authenticate(_server(request).journal, session.token), session
        except AuthError:
            return None

    def to_login(self, request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)

    async def form(self, request: Request, session: Session | None) -> dict[str, str]:
        """The POSTed form, once its CSRF token matched the session's (else refused)."""
        form = await request.form()
        given = form.get("csrf")
        if session is None or not isinstance(given, str) or not hmac.compare_digest(given, session.csrf):
            raise Refusal(403, "refused: this form's CSRF token is missing or does not match your session")
        return {k: v for k, v in form.items() if isinstance(v, str)}

    # -- signing in and out ----------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/inbox", status_code=303)

    async def login_form(self, request: Request, error: str = "", code: int = 200) -> Response:
        session = self.sessions.read(request) or Session(None, secrets.token_urlsafe(32))
        nxt = request.query_params.get("next", "/inbox")
        response = self.page(
            request, "login.html", code, who=None, csrf=session.csrf, next=_local(nxt), error=error
        )
        self.sessions.write(request, response, Session(None, session.csrf))
        return response

    async def login(self, request: Request) -> Response:
        session = self.sessions.read(request)
        try:
            form = await self.form(request, session)
        except Refusal as exc:
            return self.refused(request, exc, None)
        token = form.get("token", "").strip()
        try:
            await authenticate(_server(request).journal, token)
        except AuthError as exc:
            return await self.login_form(request, error=str(exc), code=401)
        response = RedirectResponse(_local(form.get("next", "/inbox")), status_code=303)
        # A new CSRF token for the signed-in session (never the one of the sign-in form).
        self.sessions.write(request, response, Session(token, secrets.token_urlsafe(32)))
        return response

    async def logout(self, request: Request) -> Response:
        session = self.sessions.read(request)
        try:
            await self.form(request, session)
        except Refusal as exc:
            return self.refused(request, exc, None)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return response

    # -- the inbox ---------------------------------------------------------------------

    async def inbox(self, request: Request) -> Response:
        signed = await self.who(request)
        if signed is None:
            return self.to_login(request)
        who, session = signed
        journal = _server(request).journal
        page = _page_number(request)
        tickets = list(reversed(await journal.list_tickets("pending")))  # newest first
        if who.workflows:  # only the tickets of its workflows (one read per ticket's run)
            of = {t.run_id: await journal.get_run(t.run_id) for t in tickets}
            tickets = [t for t in tickets if allowed(who, "view", run=of[t.run_id])]
        pages = max(1, math.ceil(len(tickets) / INBOX_PAGE_SIZE))
        shown = tickets[(page - 1) * INBOX_PAGE_SIZE : page * INBOX_PAGE_SIZE]
        # Each item's reads are independent: concurrently (PostgreSQL serves them on several
        # connections; it is round trips, not work, that a page of 20 items waits on).
        runs = await asyncio.gather(*(journal.get_run(t.run_id) for t in shown))
        items = await asyncio.gather(
            *(_item(journal, who, t, run) for t, run in zip(shown, runs, strict=True))
        )
        return self.page(
            request,
            "inbox.html",
            who=who,
            csrf=session.csrf,
            items=items,
            page=page,
            pages=pages,
            total=len(tickets),
        )

    async def decide_ticket(self, request: Request) -> Response:
        signed = await self.who(request)
        session = signed[1] if signed else self.sessions.read(request)
        who = signed[0] if signed else None
        try:
            form = await self.form(request, session)
            if who is None:
                raise Refusal(401, "sign in first: your session has ended or its token no longer works")
            run_id = await _decide(
                _server(request), who, request.path_params["ticket_id"], request.path_params["action"], form
            )
        except Refusal as exc:
            return self.refused(request, exc, who, session.csrf if session else "")
        return RedirectResponse(f"/runs/{quote(run_id)}", status_code=303)

    # -- runs ----------------------------------------------------------------------------

    async def runs(self, request: Request) -> Response:
        signed = await self.who(request)
        if signed is None:
            return self.to_login(request)
        who, session = signed
        server = _server(request)
        status = request.query_params.get("status") or None
        workflow = request.query_params.get("workflow") or None
        if status is not None and status not in STATUSES:
            return self.refused(request, Refusal(422, f"no run status {status!r}"), who, session.csrf)
        found = await server.journal.page_runs(
            status=status,
            workflow=workflow,
            workflows=who.workflows or None,  # a principal limited to some sees only theirs
            after=_cursor(request.query_params.get("after")),
            limit=PAGE_SIZE + 1,
        )
        shown = found[:PAGE_SIZE]
        nxt = None
        if len(found) > PAGE_SIZE:
            last = found[PAGE_SIZE - 1]
            query = {"status": status, "workflow": workflow, "after": f"{last.created_at!r}:{last.run_id}"}
            nxt = "/runs?" + urlencode({k: v for k, v in query.items() if v})
        registry = server.registry
        workflows = sorted({w.name for w in registry.workflows.values()}) if registry else []
        return self.page(
            request, "runs.html", who=who, csrf=session.csrf, runs=shown, status=status or "",
            workflow=workflow or "", statuses=STATUSES, workflows=workflows, next=nxt,
        )  # fmt: skip

    async def _run(self, request: Request) -> tuple[Principal, Session, RunRecord]:
        signed = await self.who(request)
        if signed is None:
            raise Refusal(401, "sign in first")
        who, session = signed
        try:
            run = await _server(request).journal.get_run(request.path_params["run_id"])
            authorize(who, "view", run=run)
        except TetherError as exc:
            raise _refusal(exc) from None
        return who, session, run

    async def run(self, request: Request) -> Response:
        try:
            who, session, run = await self._run(request)
        except Refusal as exc:
            return self.to_login(request) if exc.status == 401 else self.refused(request, exc, None)
        server = _server(request)
        entries = await server.journal.read_entries(run.run_id)
        workflow, why_not = _workflow(server, run)
        # The graph is tether.analysis.graph's SVG, which escapes every text it draws.
        graph = Markup(svg(workflow, run_path(run.run_id, entries))) if workflow else None
        return self.page(
            request, "run.html", who=who, csrf=session.csrf, run=run, rows=timeline(entries), graph=graph,
            why_not=why_not, last_seq=entries[-1].seq if entries else 0,
            ticket=await _pending_ticket(server.journal, run), finished=run.status in FINISHED,
        )  # fmt: skip

    async def run_graph(self, request: Request) -> Response:
        try:
            _, _, run = await self._run(request)
        except Refusal as exc:
            return Response(str(exc), status_code=exc.status, media_type="text/plain")
        server = _server(request)
        workflow, why_not = _workflow(server, run)
        if workflow is None:
            return Response(why_not, status_code=404, media_type="text/plain")
        entries = await server.journal.read_entries(run.run_id, kinds=_PATH_KINDS)
        return Response(svg(workflow, run_path(run.run_id, entries)), media_type="image/svg+xml")

    async def run_policy(self, request: Request) -> Response:
        try:
            who, session, run = await self._run(request)
        except Refusal as exc:
            return self.to_login(request) if exc.status == 401 else self.refused(request, exc, None)
        workflow, why_not = _workflow(_server(request), run)
        policy = workflow.policy if workflow else None
        return self.page(
            request, "policy.html", who=who, csrf=session.csrf, run=run, why_not=why_not,
            rules=[(r, _rule_text(r)) for r in policy.document.rules] if policy else [],
            defaults=policy.document.defaults.model_dump() if policy else {},
            source=policy.source if policy else "",
        )  # fmt: skip

    async def run_events(self, request: Request) -> Response:
        """The run's new timeline rows as they are committed (server-sent events carrying
        rendered rows for htmx to append, then the run's status); resumable with
        Last-Event-ID."""
        try:
            _, _, run = await self._run(request)
        except Refusal as exc:
            return Response(str(exc), status_code=exc.status, media_type="text/plain")
        after = _int(request.headers.get("last-event-id")) or _int(request.query_params.get("after")) or 0
        return EventSourceResponse(self._events(_server(request), run, after), ping=15)

    async def _events(self, server: api.Server, run: RunRecord, after: int) -> AsyncIterator[dict[str, str]]:
        rows = self.env.get_template("_rows.html")
        status = self.env.get_template("_status.html")
        workflow, _ = _workflow(server, run)
        drawn = (run.state, run.status)
        async for event in server.hub.stream(run.run_id, after):
            if event.get("event") == "entry":
                row = msgspec.json.decode(event["data"])
                yield {"event": "rows", "id": event["id"], "data": rows.render(rows=[row])}
            current = await server.journal.get_run(run.run_id)
            ticket = await _pending_ticket(server.journal, current)
            yield {"event": "status", "data": status.render(run=current, ticket=ticket)}
            if workflow is not None and (current.state, current.status) != drawn:  # the path grew
                drawn = (current.state, current.status)
                path = await server.journal.read_entries(run.run_id, kinds=_PATH_KINDS)
                yield {"event": "graph", "data": svg(workflow, run_path(run.run_id, path))}
            if event.get("event") == "end":  # the run finished and every row was sent
                yield {"event": "end", "data": current.status}


def _server(request: Request) -> api.Server:
    server: api.Server = request.app.state.tether
    return server


def _refusal(exc: Exception) -> Refusal:
    problem = exc if isinstance(exc, Problem) else problem_of(exc)
    return Refusal(problem.status, problem.detail)


async def _item(journal: Journal, who: Principal, ticket: Ticket, run: RunRecord) -> dict[str, Any]:
    """What a person needs to decide a ticket: the proposal, the rule and its reason, the
    evidence of the run so far, the values the decision saw."""
    asked: b.AwaitingApproval | None = None
    before: list[Entry] = []
    for entry in await journal.read_entries(run.run_id):
        body = entry.body
        if isinstance(body, b.AwaitingApproval) and body.ticket_id == ticket.ticket_id:
            asked = body
            break
        before.append(entry)
    action = "answer" if ticket.kind == "question" else "decide"
    decision = asked.decision if asked else None
    return {
        "ticket": ticket,
        "run": run,
        "decision": decision,
        "resolved": decision.resolved if decision else {},
        "provenance": decision.provenance if decision else {},
        "evidence": [r for r in timeline(before) if r["kind"] == "step" and r["outcome"] in _EVIDENCE],
        "can_decide": allowed(who, action, ticket=ticket, run=run),
        "action": action,
        "args_json": json.dumps(ticket.args, indent=2, ensure_ascii=False),
    }


async def _decide(
    server: api.Server, who: Principal, ticket_id: str, action: str, form: dict[str, str]
) -> str:
    """Decide through the kernel's one entry point (`Runtime.decide`, as the API and the CLI
    do): it authorizes the principal again and checks edited arguments by scope, schema and
    policy. Returns the run's id."""
    if action not in _ACTIONS:
        raise Refusal(404, f"no action {action!r} on tickets (approve, deny, edit, answer)")
    reason = form.get("reason", "").strip()
    answer = form.get("answer", "").strip() if action == "answer" else None
    edited = _args(form) if action == "edit" else None
    if action == "deny" and not reason:
        raise Refusal(422, "give a reason to deny: it is recorded, and the model is told it")
    if action == "answer" and not answer:
        raise Refusal(422, "write an answer: an empty answer is not recorded")
    try:
        ticket = await server.journal.get_ticket(ticket_id)
        run = await server.journal.get_run(ticket.run_id)
        authorize(who, "answer" if ticket.kind == "question" else "decide", ticket=ticket, run=run)
        if (ticket.kind == "question") != (action == "answer"):
            what = "a question: answer it" if ticket.kind == "question" else "an approval: it takes no answer"
            raise Refusal(409, f"ticket {ticket_id} is {what}")
        workflow = server.registry.workflow_for(run) if edited is not None and server.registry else None
        await server.runtime.decide(
            ticket_id, approve=action != "deny", by=who, reason=reason, answer=answer, edited_args=edited,
            workflow=workflow,
        )  # fmt: skip
    except (TetherError, Problem) as exc:
        raise _refusal(exc) from None
    record = await server.journal.get_run(run.run_id)
    server.hub.poke(record.run_id, record.last_seq, record.status)
    return run.run_id


async def _pending_ticket(journal: Journal, run: RunRecord) -> Ticket | None:
    """The ticket a paused run waits on, while it is pending."""
    if run.status != "paused":
        return None
    last = await journal.read_last_entries(run.run_id, 1)
    ticket_id = getattr(last[0].body, "ticket_id", None) if last else None
    if not isinstance(ticket_id, str):
        return None
    ticket = await journal.get_ticket(ticket_id)
    return ticket if ticket.status == "pending" else None


def _workflow(server: api.Server, run: RunRecord) -> tuple[Workflow | None, str]:
    if server.registry is None:
        return None, "this server was started without workflow folders (--workflows DIR)"
    try:
        return server.registry.workflow_for(run), ""
    except TetherError as exc:
        return None, str(exc)


_PAGE_HEADERS = {
    # Pages run no inline script and load nothing from elsewhere.
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_ACTIONS = ("approve", "deny", "edit", "answer")
_EVIDENCE = frozenset({"executed", "verification_failed", "tool_error", "answered", "refused"})
_PATH_KINDS = tuple(b.KIND_OF[k] for k in (b.RunStarted, b.StepDone, b.Transition, b.HandoffReceived))


def _args(form: dict[str, str]) -> dict[str, Any]:
    try:
        args = json.loads(form.get("args", ""))
    except json.JSONDecodeError as exc:
        raise Refusal(422, f"the edited arguments are not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise Refusal(422, "the edited arguments must be a JSON object, as the proposal's are")
    return args


def _local(target: str) -> str:
    """Where to go after signing in: a path on this site only (never another host)."""
    return (
        target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/inbox"
    )


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _page_number(request: Request) -> int:
    return max(1, _int(request.query_params.get("page")) or 1)


def _cursor(value: str | None) -> tuple[float, str] | None:
    created, _, run_id = (value or "").partition(":")
    try:
        return (float(created), run_id) if run_id else None
    except ValueError:
        return None


def web_routes(*, secret: str | None = None) -> list[BaseRoute]:
    """The web interface's routes, for `build_app(..., extra_routes=...)` (mounted at `/`).

    Sessions are signed with `secret` (`$TETHER_WEB_SECRET`); without one, with a random
    secret: every session ends when the server restarts.
    """
    return Web(secret=secret or secrets.token_urlsafe(32)).routes()
