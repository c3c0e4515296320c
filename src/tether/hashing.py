"""Canonical JSON and content hashes: the fingerprints every record is bound to.

Two encodings, both with sorted keys and no whitespace:
- `encode_json` (msgspec, ~1 µs for a small record) is what the journal stores and hashes:
  entry bodies, entry headers, argument fingerprints. Values must be JSON values with finite
  numbers; the kernel checks that where values come from outside (tool arguments and results,
  run input) before they reach it.
- `canonical_json` (the standard library) fingerprints definitions: workflow and policy hashes
  stay what they were, so runs pinned by earlier releases keep resuming.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder(order="sorted", enc_hook=str)


def encode_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, as the journal stores and hashes it."""
    return _encoder.encode(value).decode()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, for definition fingerprints."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_hex(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def fingerprint(value: Any) -> str:
    """Content hash of a definition (a JSON-compatible value), prefixed with its algorithm."""
    return "sha256:" + sha256_hex(canonical_json(value))


def value_hash(encoded: str) -> str:
    """Content hash of a value already encoded by `encode_json` (arguments, say)."""
    return "sha256:" + sha256_hex(encoded)
