"""A scripted model that takes time to answer, for workers (`--model function:slow_model:propose`).

It proposes what proposals.json lists, in turn (the position is the number of proposals
already in the transcript, so a run resumed elsewhere continues where it was), each after
`$BENCH_MODEL_SECONDS` (default 0.05 s) of waiting, as a model's API call would.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from tether import ModelContext

SCRIPT: list[dict[str, Any]] = json.loads((Path(__file__).parent / "proposals.json").read_text())["proposals"]


async def propose(ctx: ModelContext) -> dict[str, Any]:
    await asyncio.sleep(float(os.environ.get("BENCH_MODEL_SECONDS", "0.05")))
    return dict(SCRIPT[ctx.proposals_made])
