"""Canonical JSON and content hashes: the fingerprints every record is bound to."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_hex(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def fingerprint(value: Any) -> str:
    """Content hash of a JSON-compatible value, prefixed with its algorithm."""
    return "sha256:" + sha256_hex(canonical_json(value))
