"""Configuration of vendor adapters from a model spec, and the price table.

`openai:gpt-4o-mini?base_url=http://127.0.0.1:8080/v1&timeout=30` names a model and its
options in one string, so the CLI, a worker and a test all configure it the same way.
Unknown or malformed options are refused by name.

Prices are USD per million tokens, from a YAML file (`prices=FILE` or `TETHER_PRICES`):

    gpt-4o-mini: {input: 0.15, output: 0.60}
    claude-sonnet-4-6: {input: 3.0, output: 15.0}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tether.errors import ModelSpecError
from tether.models.protocol import Usage
from tether.models.retry import RetryPolicy
from tether.strict_yaml import load_yaml

OptionsT = TypeVar("OptionsT", bound=BaseModel)


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0, description="USD per million input tokens")
    output: float = Field(ge=0, description="USD per million output tokens")


class PriceTable(BaseModel):
    model_config = ConfigDict(frozen=True)

    prices: dict[str, Price] = Field(default_factory=dict)

    def cost(self, model: str, usage: Usage) -> float:
        """USD for this usage; 0 for a model not in the table (a local server, say)."""
        price = self.prices.get(model)
        if price is None:
            return 0.0
        return (usage.input_tokens * price.input + usage.output_tokens * price.output) / 1_000_000

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        file = Path(path)
        try:
            doc = load_yaml(file.read_text())
        except FileNotFoundError:
            raise ModelSpecError(f"price table not found: {file}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelSpecError(f"price table {file} cannot be read: {exc}") from None
        except yaml.YAMLError as exc:
            raise ModelSpecError(f"price table {file} is not valid YAML: {exc}") from None
        try:
            return cls(prices=doc or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ModelSpecError(f"price table {file}: {problems}") from None


class AdapterOptions(BaseModel):
    """Options every HTTP model adapter takes; each may also come from the environment."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = None
    # The name of the variable holding the key, never the key itself: specs end up in logs.
    api_key_env: str | None = None
    timeout: float = Field(60.0, gt=0, description="seconds per attempt")
    max_attempts: int = Field(4, ge=1)
    max_tokens: int = Field(1024, ge=1, description="output tokens per call, capped by the budget")
    temperature: float | None = Field(None, ge=0)
    prices: str | None = Field(None, description="YAML price table; default $TETHER_PRICES")

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.max_attempts, timeout=self.timeout)

    def price_table(self) -> PriceTable:
        path = self.prices or os.environ.get("TETHER_PRICES")
        return PriceTable.from_file(path) if path else PriceTable()

    def api_key(self, default_env: str) -> str | None:
        return os.environ.get(self.api_key_env or default_env)

    def output_tokens(self, tokens_left: int | None) -> int:
        """Ask for no more output than the token budget has left (before the call)."""
        return self.max_tokens if tokens_left is None else max(1, min(self.max_tokens, tokens_left))

    def query(self) -> str:
        return spec_query(self)


def spec_query(options: BaseModel) -> str:
    """The options that differ from the defaults, as `?key=value&...` (or ""): with the
    model name, a spec that resolves to the same adapter again (a run's pinned model)."""
    changed = options.model_dump(exclude_defaults=True)
    return "?" + urlencode(changed, safe="/:") if changed else ""


def parse_spec(prefix: str, arg: str) -> tuple[str, AdapterOptions]:
    """`MODEL?key=value&...` -> (MODEL, options)."""
    model, _, query = arg.partition("?")
    if not model:
        raise ModelSpecError(f"{prefix} model needs a name: --model {prefix}:MODEL[?option=value&...]")
    return model, parse_options(f"{prefix}:{arg}", query, AdapterOptions)


def parse_options(spec: str, query: str, options: type[OptionsT]) -> OptionsT:
    """`key=value&...` -> options of an adapter; unknown, repeated or malformed options are
    refused by name (`spec` is the whole model string, for the message)."""
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    values = dict(pairs)
    if len(values) != len(pairs):
        raise ModelSpecError(f"model {spec!r} repeats an option")
    try:
        return options.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        known = ", ".join(options.model_fields)
        raise ModelSpecError(f"model {spec!r}: {problems} (options: {known})") from None
