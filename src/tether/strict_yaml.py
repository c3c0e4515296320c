"""YAML loading for definitions written by people: strict, and bounded against hostile files.

PyYAML alone would silently keep the last of two equal keys, raise a bare `TypeError` on
a key such as `? [a]`, overflow the interpreter's stack on nesting thousands deep, and
expand a "billion laughs" file (anchors of anchors) into gigabytes once the result is
walked. `load_yaml` refuses all of these before they are built, with a `yaml.YAMLError`
that names the problem and its line, so every caller reports a definition error:

- nesting deeper than `MAX_DEPTH` (counting through aliases);
- more than `MAX_ALIAS_NODES` nodes reached through aliases, counting each use of an
  anchor as a copy of its whole subtree (what a consumer walking the result would see);
- an alias to a node that contains it (a cycle);
- duplicate and unhashable mapping keys;
- anything else PyYAML's constructors raise (a date such as 2001-02-30 raises ValueError).
"""

from __future__ import annotations

from typing import Any

import yaml

# A definition nests a few levels (policy > rules > rule > list of tools); 100 leaves room
# for any hand-written file and keeps PyYAML's recursive composer far from the stack limit.
MAX_DEPTH = 100
# Hand-written files use an anchor a few times; 10,000 copied nodes is a generous bound on
# legitimate reuse, and caps what a consumer walking the expanded value can be made to do.
MAX_ALIAS_NODES = 10_000


_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    pass


class YamlLimitError(yaml.YAMLError):
    """The document is deeper, or expands to more through aliases, than the loader allows."""


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        # Per composed node (by id; the nodes live as long as the loader): its size and
        # height as a consumer would see them, with every alias expanded.
        self._expanded: dict[int, tuple[int, int]] = {}
        self._alias_nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            self._count_alias()
            aliased = super().compose_node(parent, index)
            assert aliased is not None  # an alias event always composes its anchored node
            return aliased
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise YamlLimitError(f"nesting deeper than {MAX_DEPTH} levels at line {mark.line + 1}")
        composed = super().compose_node(parent, index)
        assert composed is not None  # compose_node is called only while events remain
        node: yaml.Node = composed
        self._depth -= 1
        size, height = 1, 1
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            child_size, child_height = self._expanded[id(child)]
            size += child_size
            height = max(height, child_height + 1)
        if height > MAX_DEPTH:
            raise YamlLimitError(
                f"nesting deeper than {MAX_DEPTH} levels (through aliases) at line {node.start_mark.line + 1}"
            )
        self._expanded[id(node)] = (size, height)
        return node

    def _count_alias(self) -> None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        node = self.anchors.get(event.anchor)
        if node is not None and id(node) not in self._expanded:
            raise YamlLimitError(
                f"alias *{event.anchor} at line {event.start_mark.line + 1} refers to a node that contains it"
            )
        if node is not None:
            self._alias_nodes += self._expanded[id(node)][0]
            if self._alias_nodes > MAX_ALIAS_NODES:
                raise YamlLimitError(
                    f"aliases expand to more than {MAX_ALIAS_NODES} nodes "
                    f"(at *{event.anchor}, line {event.start_mark.line + 1})"
                )

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:  # `<<: *base` merges; its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            mark = key_node.start_mark
            try:
                repeated = key in seen
            except TypeError:  # a list or mapping as a key: YAML allows it, Python cannot hash it
                raise yaml.constructor.ConstructorError(
                    None, None, f"a mapping key must be a scalar, not {type(key).__name__}", mark
                ) from None
            if repeated:
                raise DuplicateKeyError(f"duplicate key {key!r} at line {mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML safely within the limits above; every problem raises yaml.YAMLError."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError:
        raise
    except RecursionError:
        raise YamlLimitError("nesting too deep to parse") from None
    except Exception as exc:  # a constructor's own error (ValueError for 2001-02-30, say)
        raise yaml.YAMLError(f"{type(exc).__name__}: {exc}") from None
