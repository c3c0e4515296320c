"""Errors as problem JSON (RFC 9457): `type`, `title`, `status`, `detail`, and a `code`.

Every refusal of the API is one `Problem`; tether's own exceptions are mapped here once,
most specific first, so an endpoint raises what the kernel raised and the client reads a
stable `code` (the same words as the CLI's `--json` errors and the reason codes).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tether import errors

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://tether.dev/problems/"

TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    415: "Unsupported media type",
    422: "Unprocessable content",
    500: "Internal error",
    503: "Journal unavailable",
}


class Problem(Exception):
    """A refusal the API returns as problem JSON; nothing was changed."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra

    def response(self, headers: dict[str, str] | None = None) -> Response:
        body = {
            "type": TYPE_BASE + self.code,
            "title": TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            **self.extra,
        }
        if self.status == 401:
            headers = {"WWW-Authenticate": 'Bearer realm="tether"', **(headers or {})}
        return JSONResponse(body, status_code=self.status, media_type=MEDIA_TYPE, headers=headers)


def _code(exc: Exception, default: str) -> str:
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) and code else default


# Tether's errors, most specific first: (class, HTTP status, code when the error names none).
MAPPED: list[tuple[type[Exception], int, str]] = [
    (errors.AuthError, 401, "unauthenticated"),
    (errors.Forbidden, 403, "forbidden"),
    (errors.EditRefused, 422, "edit_refused"),
    (errors.RunNotFound, 404, "not_found"),
    (errors.TicketExpired, 409, "approval_expired"),
    (errors.TicketError, 409, "ticket_conflict"),
    (errors.ConcurrentWriteError, 409, "conflict"),
    (errors.RunStateError, 409, "run_state"),
    (errors.InputError, 422, "invalid_input"),
    (errors.DefinitionError, 422, "invalid_input"),
    (errors.PolicyFileError, 422, "invalid_input"),
    (errors.ModelSpecError, 422, "bad_model"),
    (errors.JournalError, 503, "journal_error"),
    (errors.TetherError, 422, "refused"),
]


def problem_of(exc: Exception) -> Problem:
    """The problem a tether exception stands for (most specific class first)."""
    if isinstance(exc, Problem):
        return exc
    for kind, status, code in MAPPED:
        if isinstance(exc, kind):
            reason_code = getattr(exc, "reason_code", None)
            extra = {"reason_code": str(reason_code)} if reason_code else {}
            return Problem(status, _code(exc, code), str(exc), **extra)
    return Problem(500, "internal_error", "the server failed to handle the request; see its log")


async def handle(request: Request, exc: Exception) -> Response:
    """Starlette's exception handler for every error an endpoint raises."""
    return problem_of(exc).response()
