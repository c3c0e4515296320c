"""tau2-bench's retail data is part of the repository: a plain clone reproduces every figure.

The conformance and violation tests and `bench/retail_conformance.py` read the copy in
`examples/retail/tau2/`, which keeps tau2-bench's MIT license and says where it came from.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAU2 = ROOT / "examples" / "retail" / "tau2"
# Spelled in two pieces, so that this file does not find itself.
OUTSIDE = ("../" + "shared", "shared" + "/")


def test_no_test_or_benchmark_reads_data_from_outside_the_repository() -> None:
    readers = [
        p for folder in ("tests", "bench") for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh")
    ]
    assert len(readers) > 10
    found = [
        f"{p.relative_to(ROOT)}: {needle}"
        for p in readers
        for needle in OUTSIDE
        if needle in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert found == []


def test_the_vendored_files_are_the_ones_their_readme_names_with_their_license() -> None:
    readme = (TAU2 / "README.md").read_text()
    assert "MIT" in readme and "github.com/sierra-research/tau2-bench" in readme
    assert (TAU2 / "LICENSE").read_text().startswith("MIT License")
    listed = dict(re.findall(r"\| `(\w+\.\w+)` \| [\d,]+ \| `([0-9a-f]{64})` \|", readme))
    assert sorted(listed) == ["db.json", "policy.md", "tasks.json"]
    for name, digest in listed.items():
        assert hashlib.sha256((TAU2 / name).read_bytes()).hexdigest() == digest, name
