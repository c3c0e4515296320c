"""The app `tether serve` runs, in process: with no worker of its own it still expires tickets
at their deadline (the expiry sweeper), and its event hub wakes subscribers on commits made
in the process without waiting for a poll."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from servers import PROPOSALS, REFUND, REFUND_INPUT
from tether import identity
from tether.journal import open_journal
from tether.loader import load_workflow_async
from tether.models import ScriptedModel
from tether.registry import Registry
from tether.runtime import Runtime
from tether.serve import build_app
from tether.serve.events import EventHub


@pytest.fixture(scope="module")
def short_lived_refund(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The refund example whose supervisor approval expires after one second (one copy for
    the module: its tools' module can be imported from one folder only)."""
    folder = tmp_path_factory.mktemp("workflows") / "refund"
    shutil.copytree(REFUND, folder, ignore=shutil.ignore_patterns("__pycache__"))
    policy = (folder / "policy.yaml").read_text()
    assert "    expires_in: 86400\n" in policy
    (folder / "policy.yaml").write_text(policy.replace("    expires_in: 86400\n", "    expires_in: 1\n"))
    return folder


def test_a_server_without_workers_still_expires_tickets_at_their_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_lived_refund: Path
) -> None:
    monkeypatch.setenv("REFUND_LEDGER", str(tmp_path / "ledger.sqlite"))
    # Another test may have imported another copy of the refund example's tools.
    monkeypatch.delitem(sys.modules, "refund_tools", raising=False)
    folder = short_lived_refund

    async def main() -> tuple[str, str]:
        journal = open_journal(str(tmp_path / "journal.db"))
        workflow = await load_workflow_async(folder)
        model = ScriptedModel.from_file(PROPOSALS)
        paused = await Runtime(journal).start(workflow, model, input=REFUND_INPUT, workflow_ref=str(folder))
        assert paused.status == "paused" and paused.ticket_id is not None
        token, _ = await identity.create_token(journal, name="ada", role="admin", expires_in=None)
        app = build_app(journal, registry=await Registry.load([folder]), workers=0)
        async with app.router.lifespan_context(app):
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tether")
            headers = {"Authorization": f"Bearer {token}"}
            deadline = time.monotonic() + 10
            status = "pending"
            while status == "pending" and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                listed = (await client.get("/api/v1/tickets?status=all", headers=headers)).json()["tickets"]
                status = next(t["status"] for t in listed if t["ticket_id"] == paused.ticket_id)
            await client.aclose()
        await journal.aclose()
        return status, paused.run_id

    status, run_id = asyncio.run(main())
    assert status == "expired"

    async def kinds() -> list[str]:
        journal = open_journal(str(tmp_path / "journal.db"))
        try:
            return [e.kind for e in await journal.read_entries(run_id)]
        finally:
            await journal.aclose()

    assert "ticket_expired" in asyncio.run(kinds())


def test_a_commit_in_this_process_wakes_its_subscribers_without_waiting_for_a_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_lived_refund: Path
) -> None:
    monkeypatch.setenv("REFUND_LEDGER", str(tmp_path / "ledger.sqlite"))
    # Another test may have imported another copy of the refund example's tools.
    monkeypatch.delitem(sys.modules, "refund_tools", raising=False)

    async def main() -> None:
        journal = open_journal(str(tmp_path / "journal.db"))
        workflow = await load_workflow_async(short_lived_refund)
        hub = EventHub(journal, poll_seconds=60.0)  # a poll would come far too late
        runtime = Runtime(journal, on_commit=hub.committed)
        run = await runtime.submit(
            workflow, input=REFUND_INPUT, workflow_ref=str(short_lived_refund), model_spec="x"
        )
        stream = hub.stream(run.run_id, 0)
        assert (await anext(stream))["id"] == "1"  # run_started
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)
        assert not pending.done()  # nothing new: the subscriber waits
        model = ScriptedModel.from_file(PROPOSALS)
        await runtime.resume(run.run_id, workflow, model)
        # Woken by the commit itself: the hub's poll (every 60 s) would never come in time.
        event = await asyncio.wait_for(pending, timeout=5)
        assert event["id"] == "2" and event["event"] == "entry"
        hub.close()
        await stream.aclose()
        await journal.aclose()

    asyncio.run(main())
