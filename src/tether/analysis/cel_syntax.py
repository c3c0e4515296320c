"""A syntax tree for CEL conditions, for analysis only (the engine evaluates them).

The CEL engine tether evaluates with (`common-expression-language`) exposes no syntax tree,
so the static checks read conditions with this small recursive-descent parser of CEL's
grammar (https://github.com/google/cel-spec/blob/master/doc/langdef.md#syntax). It never
decides anything: an expression it cannot read raises `CelSyntaxError`, and the analysis
then treats the whole condition as opaque, which can only make a check more cautious.
Message construction (`Type{field: ...}`) and optional syntax (`?.`) are not read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
RELATIONS = frozenset({"<", "<=", ">", ">=", "==", "!=", "in"})


class CelSyntaxError(ValueError):
    """An expression this parser does not read (the engine may still accept it)."""


@dataclass(frozen=True)
class Node:
    start: int
    end: int


@dataclass(frozen=True)
class Literal(Node):
    value: Any


@dataclass(frozen=True)
class Ident(Node):
    name: str


@dataclass(frozen=True)
class Select(Node):
    operand: Node
    field: str


@dataclass(frozen=True)
class Index(Node):
    operand: Node
    index: Node


@dataclass(frozen=True)
class Call(Node):
    """A function call `f(args)`, or a method-style call `target.f(args)` (macros too)."""

    function: str
    args: tuple[Node, ...]
    target: Node | None = None


@dataclass(frozen=True)
class ListExpr(Node):
    items: tuple[Node, ...]


@dataclass(frozen=True)
class MapExpr(Node):
    entries: tuple[tuple[Node, Node], ...]


@dataclass(frozen=True)
class Unary(Node):
    op: str  # "!" or "-"
    operand: Node


@dataclass(frozen=True)
class Binary(Node):
    op: str  # "&&", "||", a relation, or arithmetic
    left: Node
    right: Node


@dataclass(frozen=True)
class Conditional(Node):
    test: Node
    then: Node
    otherwise: Node


@dataclass(frozen=True)
class Token:
    kind: str  # "int", "float", "string", "bytes", "ident", "op", "end"
    value: Any
    start: int
    end: int


_TOKEN = re.compile(
    r"""
    (?P<space>\s+|//[^\n]*)
    |(?P<float>\d+\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\.\d+(?:[eE][+-]?\d+)?)
    |(?P<hex>0[xX][0-9a-fA-F]+[uU]?)
    |(?P<int>\d+[uU]?)
    |(?P<string>(?:[rR][bB]?|[bB][rR]?)?(?:\"\"\"|'''|"|'))
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<op>&&|\|\||==|!=|<=|>=|[<>!?:.,()\[\]{}+\-*/%])
    """,
    re.VERBOSE,
)
_ESCAPES = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
    "\\": "\\", "'": "'", '"': '"', "`": "`", "?": "?",
}  # fmt: skip
_RESERVED = frozenset({"true", "false", "null", "in"})


def tokens(text: str) -> list[Token]:
    found: list[Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise CelSyntaxError(f"unexpected character {text[pos]!r} at {pos}")
        kind = match.lastgroup or ""
        if kind == "string":
            token, pos = _string(text, pos, match.group())
            found.append(token)
            continue
        value: Any = match.group()
        if kind == "hex":
            kind, value = "int", int(value.rstrip("uU"), 16)
        elif kind == "int":
            value = int(value.rstrip("uU"))
        elif kind == "float":
            value = float(value)
        if kind != "space":
            found.append(Token(kind, value, match.start(), match.end()))
        pos = match.end()
    found.append(Token("end", None, len(text), len(text)))
    return found


def _string(text: str, start: int, opening: str) -> tuple[Token, int]:
    prefix = opening.rstrip("\"'").lower()
    quote = opening[len(prefix) :]
    raw, is_bytes = "r" in prefix, "b" in prefix
    pos, chars = start + len(opening), list[str]()
    while True:
        if text.startswith(quote, pos):
            value = "".join(chars)
            kind = "bytes" if is_bytes else "string"
            literal: Any = value.encode("utf-8") if is_bytes else value
            return Token(kind, literal, start, pos + len(quote)), pos + len(quote)
        if pos >= len(text) or (len(quote) == 1 and text[pos] == "\n"):
            raise CelSyntaxError(f"unterminated string starting at {start}")
        if text[pos] == "\\" and not raw:
            char, pos = _escape(text, pos)
            chars.append(char)
        else:
            chars.append(text[pos])
            pos += 1


def _escape(text: str, pos: int) -> tuple[str, int]:
    code = text[pos + 1 : pos + 2]
    if code in _ESCAPES:
        return _ESCAPES[code], pos + 2
    widths = {"x": 2, "X": 2, "u": 4, "U": 8}
    if code in widths:
        digits = text[pos + 2 : pos + 2 + widths[code]]
        if len(digits) == widths[code] and all(c in "0123456789abcdefABCDEF" for c in digits):
            return chr(int(digits, 16)), pos + 2 + widths[code]
    digits = text[pos + 1 : pos + 4]
    if len(digits) == 3 and all(c in "01234567" for c in digits):
        return chr(int(digits, 8)), pos + 4
    raise CelSyntaxError(f"unsupported escape sequence at {pos}")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokens(text)
        self.pos = 0
        self.depth = 0

    @property
    def token(self) -> Token:
        return self.tokens[self.pos]

    def at(self, *ops: str) -> bool:
        token = self.token
        return (token.kind == "op" or (token.kind == "ident" and token.value == "in")) and token.value in ops

    def take(self) -> Token:
        token = self.token
        self.pos += 1
        return token

    def expect(self, op: str) -> Token:
        if not self.at(op):
            raise CelSyntaxError(f"expected {op!r} at {self.token.start}")
        return self.take()

    def parse(self) -> Node:
        node = self.expr()
        if self.token.kind != "end":
            raise CelSyntaxError(f"unexpected {self.token.value!r} at {self.token.start}")
        return node

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > 200:  # the engine refuses far less; this only keeps Python's stack safe
            raise CelSyntaxError("expression nested too deeply to analyse")
        test = self.binary(0)
        if self.at("?"):
            self.take()
            then = self.binary(0)
            self.expect(":")
            otherwise = self.expr()
            test = Conditional(test.start, otherwise.end, test, then, otherwise)
        self.depth -= 1
        return test

    # Binary operators by precedence, loosest first; each level is left-associative.
    _LEVELS: tuple[tuple[str, ...], ...] = (
        ("||",),
        ("&&",),
        ("<", "<=", ">", ">=", "==", "!=", "in"),
        ("+", "-"),
        ("*", "/", "%"),
    )

    def binary(self, level: int) -> Node:
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.at(*self._LEVELS[level]):
            op = self.take().value
            right = self.binary(level + 1)
            left = Binary(left.start, right.end, op, left, right)
        return left

    def unary(self) -> Node:
        if self.at("!", "-"):
            token = self.take()
            operand = self.unary()
            if token.value == "-" and isinstance(operand, Literal) and _is_number(operand.value):
                return Literal(token.start, operand.end, -operand.value)
            return Unary(token.start, operand.end, token.value, operand)
        return self.member()

    def member(self) -> Node:
        node = self.primary()
        while self.at(".", "["):
            if self.take().value == ".":
                name = self.take()
                if name.kind != "ident":
                    raise CelSyntaxError(f"expected a field name at {name.start}")
                if self.at("("):
                    args, end = self.arguments()
                    node = Call(node.start, end, name.value, args, node)
                else:
                    node = Select(node.start, name.end, node, name.value)
            else:
                index = self.expr()
                end = self.expect("]").end
                node = Index(node.start, end, node, index)
        return node

    def arguments(self) -> tuple[tuple[Node, ...], int]:
        self.expect("(")
        args: list[Node] = []
        while not self.at(")"):
            args.append(self.expr())
            if not self.at(")"):
                self.expect(",")
        return tuple(args), self.take().end

    def primary(self) -> Node:
        token = self.token
        if token.kind in ("int", "float", "string", "bytes"):
            self.take()
            return Literal(token.start, token.end, token.value)
        if token.kind == "ident":
            return self.identifier()
        if self.at("("):
            self.take()
            inner = self.expr()
            self.expect(")")
            return inner
        if self.at("["):
            return self.list_literal()
        if self.at("{"):
            return self.map_literal()
        raise CelSyntaxError(f"unexpected {token.value!r} at {token.start}")

    def identifier(self) -> Node:
        token = self.take()
        constants = {"true": True, "false": False, "null": None}
        if token.value in constants:
            return Literal(token.start, token.end, constants[token.value])
        if token.value in _RESERVED:
            raise CelSyntaxError(f"unexpected {token.value!r} at {token.start}")
        if self.at("("):
            args, end = self.arguments()
            return Call(token.start, end, token.value, args)
        if self.at("{"):
            raise CelSyntaxError("message construction is not analysed")
        return Ident(token.start, token.end, token.value)

    def list_literal(self) -> Node:
        start = self.take().start
        items: list[Node] = []
        while not self.at("]"):
            items.append(self.expr())
            if not self.at("]"):
                self.expect(",")
        return ListExpr(start, self.take().end, tuple(items))

    def map_literal(self) -> Node:
        start = self.take().start
        entries: list[tuple[Node, Node]] = []
        while not self.at("}"):
            key = self.expr()
            self.expect(":")
            entries.append((key, self.expr()))
            if not self.at("}"):
                self.expect(",")
        return MapExpr(start, self.take().end, tuple(entries))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse(text: str) -> Node:
    """The syntax tree of a CEL expression; CelSyntaxError when it cannot be read."""
    return _Parser(text).parse()


def source(text: str, node: Node) -> str:
    """The text of `node` in `text`, on one line."""
    return " ".join(text[node.start : node.end].split())


def children(node: Node) -> list[Node]:
    match node:
        case Select(operand=operand) | Unary(operand=operand):
            return [operand]
        case Index(operand=operand, index=index):
            return [operand, index]
        case Call(args=args, target=target):
            return ([target] if target is not None else []) + list(args)
        case ListExpr(items=items):
            return list(items)
        case MapExpr(entries=entries):
            return [n for pair in entries for n in pair]
        case Binary(left=left, right=right):
            return [left, right]
        case Conditional(test=test, then=then, otherwise=otherwise):
            return [test, then, otherwise]
    return []


def bound_name(node: Node) -> str | None:
    """The variable a comprehension macro binds (`x` in `list.all(x, ...)`), else None."""
    if isinstance(node, Call) and node.target is not None and node.function in MACROS and node.args:
        first = node.args[0]
        return first.name if isinstance(first, Ident) else None
    return None
