"""Sensitive fields: values that are used but never recorded.

A tool parameter or result field is marked sensitive in the tool's type hints
(`card: Annotated[str, Sensitive]`, `-> Annotated[str, Sensitive]` for the whole result) or
in the workflow file (`sensitive_fields: [card_number, result.token]`). The runtime uses the
real value in memory (validation, the argument hash a ticket binds, policy conditions, the
tool call) and records, everywhere a record is written (entries, tickets, the paused step,
model exchanges), `{"$sensitive": "hmac-sha256:<hex>"}`: an HMAC-SHA256 of the value's
canonical JSON under a key kept outside the database. Equal values have equal fingerprints
(a reviewer can tell two calls used the same card) but nobody without the key can test a
guess against them, as they could against a plain hash of a 16-digit number.

The key: `TETHER_FINGERPRINT_KEY` (the key itself, at least 32 characters) or
`TETHER_FINGERPRINT_KEY_FILE` (a file holding it). A workflow that declares sensitive fields
is refused (`SensitiveKeyMissing`) when neither is set: never a silent clear-text record.

The value itself is kept only in this process's memory (`_vault`, keyed by fingerprint), so
that a run paused for approval can carry out the approved call when it is resumed in the
same process; resumed elsewhere (another process, after a restart) the value is not there:
the approved call is refused with `sensitive_value_unavailable` and the model proposes again.
An intent cut off by a crash is never re-run with a fingerprint in place of the value: it is
`effect_in_doubt` even for an idempotent tool.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from tether.errors import TetherError
from tether.hashing import encode_json

if TYPE_CHECKING:
    from tether.workflow import Workflow

KEY_ENV: Final = "TETHER_FINGERPRINT_KEY"
KEY_FILE_ENV: Final = "TETHER_FINGERPRINT_KEY_FILE"
MIN_KEY_CHARS: Final = 32
MARK: Final = "$sensitive"
PREFIX: Final = "hmac-sha256:"
# A value shorter than this is not scrubbed from free text (exchanges, error messages): "1"
# or "yes" would rewrite unrelated text; such a value is still fingerprinted where it is a field.
MIN_SCRUB_CHARS: Final = 4
VAULT_SIZE: Final = 10_000


class _SensitiveMarker:
    """`Annotated[str, Sensitive]`: the parameter (or, on the return type, the result) is sensitive."""

    def __repr__(self) -> str:
        return "tether.Sensitive"


Sensitive: Final = _SensitiveMarker()


class SensitiveKeyMissing(TetherError):
    """A workflow declares sensitive fields and no fingerprint key is configured."""


def is_marker(item: object) -> bool:
    return item is Sensitive or item is _SensitiveMarker


def load_key(env: Mapping[str, str] | None = None) -> bytes | None:
    """The fingerprint key from the environment, or None when none is configured. A key
    that is configured but unusable (too short, an unreadable file) is an error."""
    env = os.environ if env is None else env
    text = env.get(KEY_ENV)
    where = KEY_ENV
    if not text and env.get(KEY_FILE_ENV):
        path = Path(env[KEY_FILE_ENV])
        where = f"{KEY_FILE_ENV} ({path})"
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise SensitiveKeyMissing(f"{where}: cannot read the fingerprint key: {exc}") from None
    if not text:
        return None
    if len(text) < MIN_KEY_CHARS:
        raise SensitiveKeyMissing(
            f"{where}: the fingerprint key has {len(text)} characters; at least {MIN_KEY_CHARS} are needed "
            "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return text.encode()


def declared_fields(workflow: Workflow) -> dict[str, frozenset[str]]:
    """Each tool of the workflow that declares sensitive fields, with them."""
    return {name: t.sensitive_fields for name, t in workflow.tools().items() if t.sensitive_fields}


def placeholder(fp: str) -> dict[str, str]:
    return {MARK: fp}


def is_placeholder(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(MARK), str)


def has_placeholder(value: Any) -> bool:
    if is_placeholder(value):
        return True
    if isinstance(value, dict):
        return any(has_placeholder(v) for v in value.values())
    if isinstance(value, list):
        return any(has_placeholder(v) for v in value)
    return False


_vault: dict[str, Any] = {}


class Redactor:
    """Fingerprints the sensitive fields of one workflow's tools, and scrubs the values it has
    fingerprinted from free text (model exchanges, error messages)."""

    def __init__(self, key: bytes, fields: Mapping[str, frozenset[str]]) -> None:
        self._key = key
        self.fields = dict(fields)
        self._seen: dict[str, str] = {}  # text of a value fingerprinted here -> its fingerprint

    @classmethod
    def for_workflow(cls, workflow: Workflow, env: Mapping[str, str] | None = None) -> Redactor | None:
        """None when the workflow declares no sensitive field; SensitiveKeyMissing when it
        does and no key is configured."""
        fields = declared_fields(workflow)
        if not fields:
            return None
        key = load_key(env)
        if key is None:
            listed = "; ".join(f"{t}: {', '.join(sorted(f))}" for t, f in sorted(fields.items()))
            raise SensitiveKeyMissing(
                f"workflow {workflow.name!r} declares sensitive fields ({listed}) but no fingerprint key "
                f"is configured: set {KEY_ENV} (at least {MIN_KEY_CHARS} characters) or {KEY_FILE_ENV}; "
                "sensitive values are never recorded in clear"
            )
        return cls(key, fields)

    def fingerprint(self, value: Any) -> str:
        digest = hmac.new(self._key, encode_json(value).encode(), hashlib.sha256).hexdigest()
        fp = PREFIX + digest
        if len(_vault) >= VAULT_SIZE:
            del _vault[next(iter(_vault))]
        _vault[fp] = value
        for text in _texts(value):
            self._seen[text] = fp
        return fp

    def _mask(self, value: Any) -> Any:
        return value if is_placeholder(value) else placeholder(self.fingerprint(value))

    # -- fields, by name ------------------------------------------------------------------

    def args(self, tool: str, args: Any) -> Any:
        fields = self.fields.get(tool)
        if not fields or not isinstance(args, dict):
            return args
        return {k: self._mask(v) if k in fields else v for k, v in args.items()}

    def result(self, tool: str, result: Any) -> Any:
        fields = self.fields.get(tool)
        if not fields:
            return result
        if "result" in fields:
            return self._mask(result)
        paths = [f.split(".")[1:] for f in fields if f.startswith("result.")]
        for path in paths:
            result = self._masked_at(result, path)
        return result

    def _masked_at(self, value: Any, path: list[str]) -> Any:
        if not path or not isinstance(value, dict) or path[0] not in value:
            return value
        head, rest = path[0], path[1:]
        inner = self._masked_at(value[head], rest) if rest else self._mask(value[head])
        return {**value, head: inner}

    def proposal(self, proposal: Any) -> Any:
        """A proposal (struct or dict) with its tool call's sensitive arguments fingerprinted."""
        from tether.proposals import ToolCall

        if isinstance(proposal, ToolCall):
            return msgspec.structs.replace(proposal, args=self.args(proposal.tool, proposal.args))
        if isinstance(proposal, dict) and proposal.get("kind") == "tool_call":
            return {**proposal, "args": self.args(str(proposal.get("tool")), proposal.get("args"))}
        return proposal

    # -- values, wherever they appear ---------------------------------------------------

    def scrub(self, value: Any) -> Any:
        """`value` with every value fingerprinted so far replaced where it appears: in whole
        (a field) or inside text (a prompt, a raw response, an error message)."""
        if not self._seen:
            return value
        return _scrub(value, self._seen)

    def body(self, record: Any) -> Any:
        """An entry body with the sensitive fields of its tool call fingerprinted."""
        from tether.journal import bodies as b

        changes: dict[str, Any] = {}
        if isinstance(record, b.ToolStep):
            changes["args"] = self.args(record.tool, record.args)
            if record.proposed_args is not None:
                changes["proposed_args"] = self.args(record.tool, record.proposed_args)
            if isinstance(record, b.Executed):
                changes["result"] = self.result(record.tool, record.result)
        names = record.__struct_fields__
        proposal = getattr(record, "proposal", None) if "proposal" in names else None
        if proposal is not None:
            changes["proposal"] = self.proposal(proposal)
        if isinstance(record, b.HandedOff) and record.handoff.pending_proposal is not None:
            pending = self.proposal(record.handoff.pending_proposal)
            changes["handoff"] = msgspec.structs.replace(record.handoff, pending_proposal=pending)
        record = msgspec.structs.replace(record, **changes) if changes else record
        # Free text the tool or the model wrote (an error message, a raw output) may quote it.
        text_fields = {
            f: self.scrub(getattr(record, f))
            for f in ("error", "raw", "message")
            if f in names and getattr(record, f) is not None
        }
        return msgspec.structs.replace(record, **text_fields) if text_fields else record


def restore(value: Any) -> tuple[Any, list[str]]:
    """`value` with each fingerprint replaced by the value this process fingerprinted, and the
    fingerprints it does not hold (their values were never in this process's memory)."""
    missing: list[str] = []

    def walk(v: Any) -> Any:
        if is_placeholder(v):
            fp = v[MARK]
            if fp in _vault:
                return _vault[fp]
            missing.append(fp)
            return v
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(value), missing


def _texts(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        if len(value) >= MIN_SCRUB_CHARS:
            yield value
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int | float):
        text = encode_json(value)
        if len(text) >= MIN_SCRUB_CHARS:
            yield text
    elif isinstance(value, dict):
        for v in value.values():
            yield from _texts(v)
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)


def _scrub(value: Any, seen: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for text, fp in seen.items():
            if text in value:
                value = value.replace(text, f"[sensitive {fp}]")
        return value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        found = seen.get(encode_json(value))
        return placeholder(found) if found is not None else value
    if isinstance(value, dict):
        return {_scrub(k, seen): _scrub(v, seen) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, seen) for v in value]
    return value


def redact_for_export(value: Any, secrets: Iterable[Any]) -> Any:
    """`value` (an entry body, a ticket, a webhook payload: any JSON value) with every one of
    `secrets` replaced where it appears, whole or inside text, by `[sensitive]`. For exporters
    that hold values from outside the journal (what the journal holds is already fingerprinted):
    a last line of defence, not the redaction itself."""
    seen = {t: "" for s in secrets for t in _texts(s)}
    scrubbed = _scrub(value, seen) if seen else value
    return _unmark(scrubbed)


def _unmark(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("[sensitive ]", "[sensitive]")
    if isinstance(value, dict):
        if value == {MARK: ""}:
            return "[sensitive]"
        return {k: _unmark(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unmark(v) for v in value]
    return value
