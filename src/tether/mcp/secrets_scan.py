"""Secrets in what upstream tools return: found, redacted, and made a fact policy can read.

The gateway scans every upstream result (each string in it, at any depth) before anything
else sees it. A secret found is replaced by `[secret redacted by tether: KIND]`, so neither
the MCP client nor the journal ever holds it in clear; the finding (its kind and where it
was, never its value) is recorded with the result (`_meta["tether/secrets"]`), and the run's
fact `secrets_seen` becomes the sorted list of every kind seen so far in the session. A
policy acts on it like on any fact, e.g. no network effect once a secret went by:

    - id: no-egress-after-a-secret
      tool: "*"
      when: 'has(facts.secrets_seen) && tool.effect == "external"'
      decision: deny
      reason: a secret was seen in a tool result; nothing leaves the machine after that

Patterns are regular expressions, one named kind each, applied one after the other. The
defaults catch the shapes that are unmistakable by themselves; a team adds its own
(`--secret-pattern NAME=REGEX`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The fact a finding establishes: the kinds of secret seen so far, sorted.
FACT = "secrets_seen"
# Where a redacted result records its findings (kind and location, never the value).
META = "tether/secrets"
DEFAULT_PATTERNS: dict[str, str] = {
    # OpenAI- and Anthropic-style API keys: sk-..., sk-proj-..., sk-ant-...
    "api_key": r"\bsk-[A-Za-z0-9][A-Za-z0-9_-]{19,}",
    "aws_access_key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "github_token": r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b",
    # A PEM private key block, up to its END line (or the end of the text, if it was cut).
    "private_key": (
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
        r"(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)"
    ),
    "jwt": r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",
}
_KIND = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


class SecretPatternError(ValueError):
    """A pattern that is not usable: a bad name or a regular expression that does not compile."""


@dataclass(frozen=True)
class Finding:
    """One secret found: its kind and where it was in the result (a JSON path)."""

    kind: str
    where: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "where": self.where}


class SecretScan:
    """The patterns of one gateway, compiled into one expression (one pass over each string)."""

    def __init__(self, patterns: Mapping[str, str] | None = None) -> None:
        self.patterns = dict(DEFAULT_PATTERNS if patterns is None else patterns)
        self._compiled: list[tuple[str, re.Pattern[str]]] = []
        for kind, pattern in self.patterns.items():
            if not _KIND.fullmatch(kind):
                raise SecretPatternError(f"secret kind {kind!r}: letters, digits and _ only, a letter first")
            try:
                self._compiled.append((kind, re.compile(pattern)))
            except re.error as exc:
                raise SecretPatternError(
                    f"secret pattern {kind}: {pattern!r} is not a regular expression: {exc}"
                ) from None

    @classmethod
    def with_extra(cls, values: Sequence[str], *, defaults: bool = True) -> SecretScan:
        """The defaults (unless `defaults` is false) and `NAME=REGEX` values."""
        patterns = dict(DEFAULT_PATTERNS) if defaults else {}
        for value in values:
            kind, sep, pattern = value.partition("=")
            if not sep or not pattern:
                raise SecretPatternError(f"--secret-pattern {value!r}: give NAME=REGEX")
            patterns[kind.strip()] = pattern
        return cls(patterns)

    def text(self, text: str, where: str = "") -> tuple[str, list[Finding]]:
        """`text` with each secret replaced, and what was found."""
        found: list[Finding] = []
        for kind, pattern in self._compiled:

            def redact(match: re.Match[str], kind: str = kind) -> str:
                found.append(Finding(kind, where))
                return f"[secret redacted by tether: {kind}]"

            text = pattern.sub(redact, text)
        return text, found

    def value(self, value: Any, where: str = "") -> tuple[Any, list[Finding]]:
        """A JSON value with every string in it redacted (keys are left as they are)."""
        if isinstance(value, str):
            return self.text(value, where)
        found: list[Finding] = []
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                out[key], more = self.value(item, f"{where}.{key}" if where else str(key))
                found += more
            return out, found
        if isinstance(value, list):
            items = []
            for i, item in enumerate(value):
                redacted, more = self.value(item, f"{where}[{i}]")
                items.append(redacted)
                found += more
            return items, found
        return value, found


def findings_of(result: Any) -> list[dict[str, str]]:
    """The findings a redacted result records (none when it records none)."""
    meta = result.get("_meta") if isinstance(result, dict) else None
    found = meta.get(META) if isinstance(meta, dict) else None
    return [f for f in found if isinstance(f, dict)] if isinstance(found, list) else []


def seen_after(facts: Mapping[str, Any], findings: Sequence[Mapping[str, str]]) -> list[str]:
    """The fact `secrets_seen` once these findings are added to what the run had seen."""
    before = facts.get(FACT)
    kinds = set(before) if isinstance(before, list) else set()
    return sorted(kinds | {f["kind"] for f in findings})
