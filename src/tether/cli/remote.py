"""The CLI through a server (`--server URL`, token from `$TETHER_TOKEN`) instead of the journal.

Through a server the CLI acts as the token's principal, with that token's role and scope:
the server decides and records who it was. Its refusals (problem JSON) are printed like the
CLI's own errors, with the server's `code`, and exit 2.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, NoReturn

import typer

from tether.cli.common import fail, out, print_json, short

SERVER_ENV = "TETHER_SERVER"
TOKEN_ENV = "TETHER_TOKEN"
TIMEOUT = 30.0

ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar=SERVER_ENV,
        metavar="URL",
        help=f"Act through a tether server (e.g. http://127.0.0.1:8080) as the principal of ${TOKEN_ENV}, "
        "instead of opening the journal directly (as the local administrator).",
    ),
]


def call(
    server: str, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None
) -> Any:
    """One API request; the response's JSON, or the server's problem as a CLI error."""
    import httpx

    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        fail(
            f"--server needs an API token in ${TOKEN_ENV} (tether token create NAME --role ROLE)",
            "unauthenticated",
        )
    url = server.rstrip("/") + "/api/v1" + path
    try:
        response = httpx.request(
            method,
            url,
            params={k: v for k, v in (params or {}).items() if v is not None},
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=TIMEOUT,
        )
    except httpx.HTTPError as exc:
        fail(f"cannot reach the tether server at {server}: {exc}", "unreachable")
    if response.is_success:
        return response.json()
    _refused(response)


def _refused(response: Any) -> NoReturn:
    try:
        problem = response.json()
        code, detail = str(problem["code"]), str(problem["detail"])
    except (ValueError, KeyError, TypeError):
        code, detail = "server_error", f"HTTP {response.status_code}: {short(response.text, 200)}"
    fail(f"the server refused ({response.status_code}): {detail}", code)


def decide(server: str, ticket_id: str, verb: str, body: dict[str, Any], as_json: bool) -> None:
    decided = call(server, "POST", f"/tickets/{ticket_id}/{verb}", body=body)
    if as_json:
        print_json(decided)
        return
    ticket, run = decided["ticket"], decided["run"]
    out.print(
        f"ticket {ticket['ticket_id']} {ticket['status']} by {ticket['decided_by']}; run {run['run_id']} is "
        f"{run['status']}: the server's workers continue it (tether show {run['run_id']} --server {server})",
        markup=False,
    )


def runs(server: str, status: str | None, limit: int, as_json: bool) -> None:
    page = call(server, "GET", "/runs", params={"status": status, "limit": min(limit, 200)})
    if as_json:
        print_json(page["runs"])
        return
    if not page["runs"]:
        out.print(f"no runs{f' with status {status}' if status else ''}")
        return
    rows = [["run", "workflow", "status", "state", "owner", "reason", "updated", "note"]]
    for r in page["runs"]:
        rows.append(
            [
                r["run_id"],
                f"{r['workflow']} {r['workflow_version']}",
                r["status"],
                r["state"],
                r["owner"] or "",
                r["reason_code"] or "",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["updated_at"])),
                short(r["message"] or "", 120),
            ]
        )
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    for row in rows:
        out.print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), markup=False)


def show(server: str, run_id: str, as_json: bool) -> list[dict[str, Any]] | None:
    """Print the run's header; return its timeline rows for the caller to print (or None)."""
    detail = call(server, "GET", f"/runs/{run_id}")
    if as_json:
        print_json(detail)
        return None
    run, chain = detail["run"], detail["chain"]
    out.print(
        f"[bold]{run['run_id']}[/]  {run['workflow']} {run['workflow_version']}  "
        f"status [bold]{run['status']}[/]  state {run['state']}"
    )
    intact = "intact" if chain["intact"] else "BROKEN: " + "; ".join(chain["problems"])
    out.print(f"  via {server}  journal {intact}", markup=False)
    steps: list[dict[str, Any]] = detail["steps"]
    return steps
