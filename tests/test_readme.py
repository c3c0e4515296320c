"""The README's Python example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_python_example_in_the_readme_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "asyncio.run" in b)
    code = block.replace('"examples/refund"', repr(str(ROOT / "examples" / "refund")))
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        # PYTHONPATH kept: the tether under test, not whichever is installed.
        env={"PATH": "/usr/bin:/bin", "REFUND_LEDGER": str(tmp_path / "l.db")}
        | {k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("completed")
