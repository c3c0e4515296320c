"""Provenance: where the values a run has seen came from, and where an argument could have come from.

The runtime sees everything that enters a run, so it can say where a proposed argument could
have come from. What enters a run (each a `Source`):

- the run's **input**: trusted (given by whoever started the run);
- a person's **answer** to a question (and a person's note on an effect in doubt): trusted,
  recorded with who gave it;
- a deterministic step's **update** to the run's data: trusted (the workflow's own code),
  except what the model itself had put into the data through an exit;
- a tool's **result** (or its error): trusted or untrusted as the tool declares
  (`@tool(results="untrusted")`; MCP tools are untrusted unless declared otherwise). A
  trusted tool does not vouch for values it was given as arguments (a search that echoes
  its query does not make the query trusted).

The model's own text is not a source: a value that matches nothing is **derived**.

`SeenValues` indexes those values as they arrive (normalized keys in two dictionaries and
each text's token sequence; `add` only queues, the index is built when a decision first
needs it), so tracing one argument costs a few dictionary lookups, not a scan of the run.
`SeenValues.trace(value)` returns a `Traced`: `trusted` (the whole value was given by a
trusted source), `untrusted` (the value, or a part of it such as an address inside a URL or
an email body, was seen in untrusted content and not given by a trusted source), `derived`
(nothing matched) and the `sources`, each with the observation, the path inside it and how
it matched.

Matching is deliberately asymmetric. A value counts as *given by a trusted source* only for
matches that cannot be forged by someone who writes untrusted content: the same text up to
case and spacing, digit groups with or without separators (IBANs, phone numbers, card
numbers), numbers in any notation, URL-encoding and base64, or the same tokens inside a
longer trusted text. Looser matches — Unicode look-alikes (NFKC plus a table of Cyrillic and
Greek letters that look Latin) and punctuation removed — only ever find *untrusted* sources:
`pаypal.com` with a Cyrillic `а` is not the `paypal.com` the user typed, but it is the one
the attacker's email carried.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from tether.journal import Entry
from tether.journal import bodies as b
from tether.tools import Trust

SourceKind = Literal["input", "answer", "workflow", "tool"]
# Sources listed per traced value (in conditions and in the record); the rest are counted.
MAX_SOURCES = 20
# Digit-bearing word runs (IBANs, phone numbers) longer than this many words are indexed in
# windows of this size: the sub-runs of a window are every way a value may have been cut.
MAX_RUN_WORDS = 12
# A value longer than this is not one identifier (the longest IBAN is 34 characters, 42 spaced).
MAX_RUN_CHARS = 64
# A run of digit groups is an identifier when it holds at least this many digits.
MIN_RUN_DIGITS = 6
# A seen text longer than this is not kept whole (an argument that long copied exactly is
# reported as a normalized match).
MAX_KEPT_CHARS = 256
# Base64 shorter than this is too likely an ordinary word to be decoded.
MIN_BASE64_CHARS = 12

# Letters of other scripts that look like Latin ones, mapped before case folding (upper and
# lower case differ: Greek capital eta looks like H, its small letter like n).
_LOOKALIKES = str.maketrans(
    {
        # Cyrillic
        "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C",
        "Т": "T", "Х": "X", "У": "Y", "Ѕ": "S", "І": "I", "Ј": "J", "Ԛ": "Q", "Ԝ": "W", "Ү": "Y",
        "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
        "т": "t", "х": "x", "у": "y", "ѕ": "s", "і": "i", "ј": "j", "ԛ": "q", "ԝ": "w", "ү": "y",
        "һ": "h", "ԁ": "d", "ӏ": "l", "ɡ": "g", "ь": "b", "п": "n", "г": "r",
        # Greek
        "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
        "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
        "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
        "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j",
        # Latin letters that pass for others
        "ı": "i", "ȷ": "j", "ɑ": "a",
    }
)  # fmt: skip
_EDGE = "\"'()[]{}<>.,;:!?*`«»“”‘’„"
_NON_ALNUM = re.compile(r"[\W_]+")
_DIGIT = re.compile(r"\d")
_DIGIT_WORD = re.compile(r"[^\W_]*\d[^\W_]*")
# Between two digit groups of one identifier: short separators, and short letter groups.
_RUN_GAP = re.compile(r"[\s\-./()+]{1,3}(?:[^\W\d_]{1,4}[\s\-./()+]{1,3})*")
_ONE_RUN = re.compile(
    r"[\s\-./()+]*(?:[^\W_]{1,4}|[^\W_]*\d[^\W_]*)(?:[\s\-./()+]{1,3}(?:[^\W_]{1,4}|[^\W_]*\d[^\W_]*))*"
)
_NUMBER = re.compile(r"[-+]?[$€£¥]?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?[$€£¥%]?")
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|www\.)")
_DOMAIN = re.compile(r"^[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")


# -- normalization ----------------------------------------------------------------------


def strict(text: str) -> str:
    """The form trusted matches compare: case folded, spacing collapsed."""
    return " ".join(text.casefold().split())


def loose(text: str) -> str:
    """The form untrusted matches also compare: compatibility forms (NFKC: full-width
    letters, ligatures), Latin look-alikes, case, and every character but letters and
    digits removed."""
    return _NON_ALNUM.sub("", _loose_fold(text))


def _loose_fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_LOOKALIKES).casefold()


def number_key(value: float) -> str:
    """A number's key: 5000, 5000.0 and "5,000.00" are the same amount."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _number_in(token: str) -> str | None:
    match = _NUMBER.fullmatch(token)
    if match is None:
        return None
    text = match.group(1).replace(",", "") + (match.group(2) or "")
    try:
        return number_key(float(text))
    except (ValueError, OverflowError):
        return None


def _tokens(text: str) -> list[str]:
    """Whitespace-separated tokens without their surrounding punctuation (case kept)."""
    return [t for t in (raw.strip(_EDGE) for raw in text.split()) if t]


def _runs(folded: str, *, every: bool) -> Iterator[str]:
    """Identifiers written in digit groups (IBANs, phone, card and account numbers), with the
    separators removed: runs of digit-bearing words joined by short separators (and short
    letter groups: the bank code of a British IBAN) that hold at least MIN_RUN_DIGITS digits.

    `every`: every sub-run (what a seen text is indexed under: any way a value may have been
    cut from it); else each whole run, and the run without a leading group of up to three
    characters (a country code), which is what a value is looked up by."""
    words = list(_DIGIT_WORD.finditer(folded))
    group: list[re.Match[str]] = []
    for word in words:
        if group and not _RUN_GAP.fullmatch(folded, group[-1].end(), word.start()):
            yield from _sub_runs(folded, group, every)
            group = []
        group.append(word)
    if group:
        yield from _sub_runs(folded, group, every)


def _sub_runs(folded: str, group: list[re.Match[str]], every: bool) -> Iterator[str]:
    digits = [sum(c.isdigit() for c in w.group()) for w in group]
    if sum(digits) < MIN_RUN_DIGITS:
        return
    starts = range(len(group)) if every else [0, 1] if len(group) > 1 and len(group[0].group()) <= 3 else [0]
    for i in starts:
        held = 0
        last = min(len(group), i + MAX_RUN_WORDS) if every else len(group)
        for j in range(i, last):
            held += digits[j]
            if held >= MIN_RUN_DIGITS and (every or j == last - 1):
                yield _NON_ALNUM.sub("", folded[group[i].start() : group[j].end()])


def _decoded(token: str) -> list[str]:
    """What a token reads as once decoded: URL-encoding, base64 (of printable text)."""
    found = []
    if "%" in token or ("+" in token and "=" in token):
        plain = unquote_plus(token)
        if plain != token:
            found.append(plain)
    if len(token) >= MIN_BASE64_CHARS and _BASE64.fullmatch(token):
        padded = token + "=" * (-len(token) % 4)
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                text = decode(padded.encode()).decode("utf-8")
            except (binascii.Error, ValueError):
                continue
            if text and all(c.isprintable() or c.isspace() for c in text):
                found.append(text)
                break
    return found


def _url_parts(token: str) -> list[str]:
    """A URL's host (without www.) and its query values."""
    try:
        url = urlsplit(token if "://" in token else "http://" + token)
        host = url.hostname or ""
        values = [v for _, v in parse_qsl(url.query)] + ([url.fragment] if url.fragment else [])
    except ValueError:
        return []
    return [host.removeprefix("www."), *values] if host else values


def _distinctive(key: str) -> bool:
    """Whether a part of a longer value is specific enough that seeing it elsewhere means the
    value carries it: an address, a domain, a path, an identifier — not an ordinary word."""
    if "@" in key or ("/" in key and len(key) >= 4) or _DOMAIN.fullmatch(key):
        return True
    return len(key) >= MIN_RUN_DIGITS and _DIGIT.search(key) is not None


@dataclass
class _Keys:
    """The keys of one text: `whole` (strict), `parts` (strict: tokens, runs, numbers, URL
    hosts and query values, email domains, decoded text), `loose_whole`, `loose_parts`,
    and the token sequences that a longer value is looked for in."""

    whole: set[str]
    parts: set[str]
    loose_whole: str
    loose_parts: set[str]
    tokens: list[str]
    sequence: str


def _keys(text: str, *, query: bool = False, depth: int = 0) -> _Keys:
    """The keys of a seen text, or (`query`) of a value looked up."""
    folded = strict(text)
    loose_folded = _loose_fold(text)
    raw_tokens = _tokens(text)
    tokens = [t.casefold() for t in raw_tokens]
    loose_tokens = [k for k in (_NON_ALNUM.sub("", t) for t in loose_folded.split()) if k]
    whole = {folded}
    one_run = _is_one_run(folded)
    if one_run:  # an IBAN or a phone number as a whole: without its separators
        whole.add(_NON_ALNUM.sub("", folded))
        if query:
            whole.update(_runs(folded, every=False))
    number = _number_in(tokens[0]) if len(tokens) == 1 and _DIGIT.search(tokens[0]) else None
    if number is not None:
        whole.add(number)
    runs = set(_runs(folded, every=not query)) if _DIGIT.search(folded) and not (query and one_run) else set()
    parts = {*tokens, *runs}
    loose_parts = {*loose_tokens, *runs}
    others: list[str] = []  # parts beyond the tokens (their loose forms are made here)
    for raw, token in zip(raw_tokens, tokens, strict=True):
        if _DIGIT.search(token) and (number := _number_in(token)) is not None:
            parts.add(number)
        if "@" in token:
            others.append(token.rpartition("@")[2])
        if ("." in token or ":" in token) and (_URL.match(token) or _DOMAIN.fullmatch(token)):
            others.extend(strict(p) for p in _url_parts(token))
        if depth == 0 and ("%" in raw or "=" in raw or len(raw) >= MIN_BASE64_CHARS):
            for plain in _decoded(raw):
                inner = _keys(plain, query=query, depth=1)
                parts |= inner.whole | inner.parts
                loose_parts |= inner.loose_parts | {inner.loose_whole}
    parts.update(others)
    loose_parts.update(loose(p) for p in others)
    parts.discard("")
    loose_parts.discard("")
    return _Keys(
        whole,
        parts,
        _NON_ALNUM.sub("", loose_folded),
        loose_parts,
        tokens,
        " ".join(tokens),
    )


def _is_one_run(folded: str) -> bool:
    """Whether a value is nothing but digit groups and separators (an IBAN, a phone number)."""
    return (
        len(folded) <= MAX_RUN_CHARS
        and _ONE_RUN.fullmatch(folded) is not None
        and sum(c.isdigit() for c in folded) >= MIN_RUN_DIGITS
    )


# -- sources and what a trace finds -----------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where seen values came from: one input, answer, step update or tool result."""

    kind: SourceKind
    trust: Trust
    step_id: str | None = None
    tool: str | None = None
    by: str | None = None
    # Loose keys of what a trusted tool was called with: it does not vouch for those.
    echo: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Found:
    """One place a traced value (or a part of it) was seen."""

    source: Source
    path: str
    match: Literal["exact", "normalized", "inside", "part"]
    lookalike: bool = False  # only after folding look-alikes and punctuation: never vouches
    part: str | None = None

    def as_dict(self) -> dict[str, Any]:
        s = self.source
        found: dict[str, Any] = {"kind": s.kind, "trust": s.trust, "step_id": s.step_id, "tool": s.tool}
        found |= {"by": s.by, "path": self.path, "match": self.match}
        if self.lookalike:
            found["lookalike"] = True
        if self.part is not None:
            found["part"] = self.part
        return found


@dataclass
class Traced:
    """The provenance of one value (an argument, an element of one, anything a condition
    passes to `provenance()`)."""

    trusted: bool
    untrusted: bool
    sources: list[Found]

    @property
    def derived(self) -> bool:
        """Nothing the run has seen matches: the model's own text."""
        return not self.sources

    def as_cel(self) -> dict[str, Any]:
        """What `provenance(value)` gives a condition."""
        return {
            "trusted": self.trusted,
            "untrusted": self.untrusted,
            "derived": self.derived,
            "sources": [f.as_dict() for f in self.sources[:MAX_SOURCES]],
        }

    def record(self) -> dict[str, Any]:
        """As recorded with a decision: bounded, with the number of sources left out."""
        recorded = self.as_cel()
        if len(self.sources) > MAX_SOURCES:
            recorded["more_sources"] = len(self.sources) - MAX_SOURCES
        return recorded


def summary(recorded: Mapping[str, Any]) -> str:
    """One line a person reads: where a value could have come from (from a recorded trace)."""
    sources = recorded.get("sources") or []
    if not sources:
        return "derived: matches nothing the run has seen (the model's own)"
    if recorded.get("trusted"):
        head = "given by a trusted source"
    elif recorded.get("untrusted"):
        whole = any(s.get("match") != "part" for s in sources if s.get("trust") == "untrusted")
        head = (
            "appears only in untrusted content" if whole else "carries what appears only in untrusted content"
        )
    else:
        head = "not given by a trusted source (look-alikes only)"
    places = [_place(s) for s in sources[:3]]
    more = len(sources) - 3 + int(recorded.get("more_sources") or 0)
    return f"{head}: " + "; ".join(places) + (f"; and {more} more" if more > 0 else "")


def _place(found: Mapping[str, Any]) -> str:
    step, path = found.get("step_id"), found.get("path")
    match found.get("kind"):
        case "input":
            where = f"{path} of the run's input"
        case "answer":
            where = f"{found.get('by') or 'a person'}'s answer ({step})"
        case "workflow":
            where = f"{path} of the workflow's step {step}"
        case _:
            where = f"{path} returned by {found.get('tool')} ({step}, {found.get('trust')})"
    how = {"exact": "in ", "normalized": "normalized, in ", "inside": "inside ", "part": "inside "}
    part = f"{found['part']!r} " if found.get("part") else ""
    alike = " (a look-alike)" if found.get("lookalike") else ""
    return f"{part}{how.get(str(found.get('match')), '')}{where}{alike}"


# -- the index ------------------------------------------------------------------------------


@dataclass
class _Leaf:
    source: int
    path: str
    text: str | None  # kept when short, to tell an exact match from a normalized one
    sequence: str


class SeenValues:
    """The values a run has seen, indexed by normalized keys as they arrive.

    `add_input` and `add_entry` queue what a run records; the queue is indexed when `trace`
    first needs it. `trust_of(tool)` says how the workflow declares a tool's results, for
    records written before results carried their trust.
    """

    def __init__(self, trust_of: Callable[[str], Trust] | None = None) -> None:
        self._trust_of = trust_of or (lambda _: "trusted")
        # Entries and values not indexed yet, in the order they arrived.
        self._queue: list[Entry | tuple[Source, str, Any]] = []
        self._sources: list[Source] = []
        self._leaves: list[_Leaf] = []
        # key -> leaf refs (an int when one, the common case); a ref is the leaf id doubled,
        # +1 when the key is the leaf's whole text.
        self._strict: dict[str, int | list[int]] = {}
        self._loose: dict[str, int | list[int]] = {}
        # Loose keys of values the model put into the run's data (exits): not vouched for by
        # a deterministic step that copies them.
        self._model_keys: set[str] = set()

    # -- what arrives --------------------------------------------------------------------

    def add_input(self, value: Mapping[str, Any]) -> None:
        self._queue.append((Source("input", "trusted"), "input", dict(value)))

    def add_result(
        self,
        tool: str,
        result: Any,
        *,
        trust: Trust,
        step_id: str | None = None,
        args: Mapping[str, Any] | None = None,
    ) -> None:
        """A tool's result seen outside a journal (a policy test case's observations)."""
        self._queue.append(
            (self._tool(tool, step_id, trust == "untrusted", dict(args or {})), "result", result)
        )

    def add_entry(self, entry: Entry) -> None:
        """What one journal entry adds (entries that carry no seen value add nothing)."""
        if entry.kind in _SEEN_KINDS or entry.kind == "step":
            self._queue.append(entry)

    def _read(self, entry: Entry) -> tuple[Source, str, Any] | None:
        """The source and value one entry holds, if any."""
        record, step = entry.body, entry.step_id
        match record:
            case b.RunStarted(input=given):
                return Source("input", "trusted"), "input", given
            case b.Executed(tool=tool, result=result, args=args, untrusted=untrusted):
                return self._tool(tool, step, untrusted, args), "result", result
            case b.ToolFailed(tool=tool, error=error, args=args, untrusted=untrusted):
                return self._tool(tool, step, untrusted, args), "error", error
            case b.Answered(answer=answer, reason=reason, by=by):
                said = {k: v for k, v in (("answer", answer), ("reason", reason)) if v}
                return Source("answer", "trusted", step, by=by), "", said
            case b.EffectSettled(note=note, by=by) if note:
                return Source("answer", "trusted", step, by=by), "note", note
            case b.TakenOver(data=data, by=by) if data:  # a person chose the exit, with data
                return Source("answer", "trusted", step, by=by.principal_id), "data", data
            case b.Transition(proposal=proposal) if proposal.update:
                self._model_keys |= _loose_keys_of(proposal.update)
            case b.StepDone(update=update) if update:
                return Source("workflow", "trusted", step, echo=frozenset(self._model_keys)), "update", update
        return None

    def _tool(self, tool: str, step: str | None, untrusted: bool, args: Any) -> Source:
        trust: Trust = "untrusted" if untrusted or self._trust_of(tool) == "untrusted" else "trusted"
        echo = frozenset(_loose_keys_of(args)) if trust == "trusted" else frozenset()
        return Source("tool", trust, step, tool, echo=echo)

    def _settle(self) -> None:
        queue, self._queue = self._queue, []
        for item in queue:
            held = self._read(item) if isinstance(item, Entry) else item
            if held is None:
                continue
            source, path, value = held
            self._sources.append(source)
            sid = len(self._sources) - 1
            for leaf_path, text in _leaves(value, path):
                self._index(sid, leaf_path, text)

    def _index(self, sid: int, path: str, text: str) -> None:
        keys = _keys(text)
        lid = len(self._leaves)
        kept = text if len(text) <= MAX_KEPT_CHARS else None
        self._leaves.append(_Leaf(sid, path, kept, keys.sequence))
        whole, part = lid * 2 + 1, lid * 2
        for key in keys.whole:
            _post(self._strict, key, whole)
        for key in keys.parts - keys.whole:
            _post(self._strict, key, part)
        if keys.loose_whole:
            _post(self._loose, keys.loose_whole, whole)
        for key in keys.loose_parts - {keys.loose_whole}:
            _post(self._loose, key, part)

    # -- tracing -------------------------------------------------------------------------

    def trace(self, value: Any) -> Traced:
        """Where `value` could have come from: every leaf of a list or mapping on its own."""
        if self._queue:
            self._settle()
        found: list[Found] = []
        leaves = list(_leaves(value, ""))
        trusted = bool(leaves)
        untrusted = False
        for _, text in leaves:
            leaf_trusted, leaf_untrusted, leaf_found = self._trace_text(text)
            trusted = trusted and leaf_trusted
            untrusted = untrusted or leaf_untrusted
            found.extend(f for f in leaf_found if f not in found)
        return Traced(trusted, untrusted, found)

    def _trace_text(self, text: str) -> tuple[bool, bool, list[Found]]:
        keys = _keys(text, query=True)
        whole = self._matches(text, keys.whole, {keys.loose_whole}, keys)
        trusted = any(self._vouches(f, keys.loose_whole) for f in whole)
        untrusted = not trusted and any(f.source.trust == "untrusted" for f in whole)
        found = list(whole)
        if trusted or untrusted:  # all of it came from there: its parts say nothing more
            return trusted, untrusted, found
        # A value composed by the model (a URL, an email body) may carry what untrusted content
        # said: its distinctive parts, longest first (a part inside one already found is not
        # looked up again).
        seen: list[str] = []
        for key in sorted(
            (k for k in keys.parts - keys.whole if _distinctive(k)), key=lambda k: (-len(k), k)
        ):
            if any(key in longer for longer in seen):
                continue
            loose_key = loose(key)
            parts = [
                Found(f.source, f.path, "part", f.lookalike, key)
                for f in self._matches(key, {key}, {loose_key} if loose_key else set(), None)
            ]
            if not parts:
                continue
            seen.append(key)
            if not any(self._vouches(f, loose_key) for f in parts):
                untrusted = untrusted or any(f.source.trust == "untrusted" for f in parts)
            found.extend(f for f in parts if f not in found)
        return False, untrusted, found

    def _vouches(self, found: Found, loose_key: str) -> bool:
        source = found.source
        return source.trust == "trusted" and not found.lookalike and loose_key not in source.echo

    def _matches(
        self, text: str, strict_keys: set[str], loose_keys: set[str], keys: _Keys | None
    ) -> list[Found]:
        """Leaves holding the value: strictly (exact, normalized, inside), then loosely."""
        hits: dict[int, Found] = {}
        for key in strict_keys:
            for ref in _refs(self._strict, key):
                lid, is_whole = divmod(ref, 2)
                leaf = self._leaves[lid]
                how = ("exact" if leaf.text == text else "normalized") if is_whole else "inside"
                if lid not in hits or how == "exact":
                    hits[lid] = Found(self._sources[leaf.source], leaf.path, how)
        if keys is not None and len(keys.tokens) > 1:
            for lid in self._containing(keys.tokens, keys.sequence, strict_index=True):
                hits.setdefault(
                    lid, Found(self._sources[self._leaves[lid].source], self._leaves[lid].path, "inside")
                )
        for key in loose_keys:
            for ref in _refs(self._loose, key):
                lid, is_whole = divmod(ref, 2)
                if lid not in hits:
                    leaf = self._leaves[lid]
                    hits[lid] = Found(
                        self._sources[leaf.source], leaf.path, "normalized" if is_whole else "inside", True
                    )
        loose_sequence = _loose_sequence(keys.sequence) if keys is not None and len(keys.tokens) > 1 else ""
        if loose_sequence:
            for lid in self._containing(loose_sequence.split(), loose_sequence, strict_index=False):
                if lid not in hits:
                    leaf = self._leaves[lid]
                    hits[lid] = Found(self._sources[leaf.source], leaf.path, "inside", True)
        return [hits[lid] for lid in sorted(hits)]

    def _containing(self, tokens: list[str], sequence: str, *, strict_index: bool) -> list[int]:
        """Leaves whose token sequence contains this one: candidates from the rarest token."""
        index = self._strict if strict_index else self._loose
        postings = [_refs(index, t) for t in set(tokens)]
        if not postings or not all(postings):
            return []
        rarest = min(postings, key=len)
        wanted = f" {sequence} "
        found = []
        for lid in sorted({ref // 2 for ref in rarest}):
            leaf = self._leaves[lid]
            held = leaf.sequence if strict_index else _loose_sequence(leaf.sequence)
            if wanted in f" {held} ":
                found.append(lid)
        return found


_SEEN_KINDS = frozenset(
    {
        "run_started",
        "taken_over",
        "executed",
        "verification_failed",
        "tool_failed",
        "answered",
        "unanswered",
        "effect_settled",
        "transition",
        "step_done",
    }
)


def _post(index: dict[str, int | list[int]], key: str, ref: int) -> None:
    held = index.get(key)
    if held is None:
        index[key] = ref
    elif isinstance(held, int):
        index[key] = [held, ref]
    else:
        held.append(ref)


def _refs(index: dict[str, int | list[int]], key: str) -> list[int] | tuple[int, ...]:
    held = index.get(key)
    if held is None:
        return ()
    return (held,) if isinstance(held, int) else held


def _loose_sequence(sequence: str) -> str:
    """A token sequence in loose form (made when a multi-word value is looked for loosely:
    the index keeps one form of each text)."""
    return " ".join(k for k in (_NON_ALNUM.sub("", t) for t in _loose_fold(sequence).split()) if k)


def _leaves(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string and number inside a JSON value, with its path (booleans and nulls carry
    nothing a value could come from)."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, str):
        if value.strip():
            yield path or "(value)", value
    elif isinstance(value, int | float):
        yield path or "(value)", number_key(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")


def _loose_keys_of(value: Any) -> set[str]:
    """Loose keys of every leaf of a value and of its distinctive parts (what echoes match)."""
    found: set[str] = set()
    for _, text in _leaves(value, ""):
        keys = _keys(text)
        found.add(keys.loose_whole)
        found |= keys.loose_parts
    found.discard("")
    return found
