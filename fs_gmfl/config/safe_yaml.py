"""A bounded, strict YAML reader for configuration files and ``KEY VALUE`` overrides.

PyYAML's ``safe_load`` builds only plain data, but it still

* keeps the last of two equal keys in one mapping, silently dropping the
  earlier value (a section written twice loses its first half);
* accepts any number of aliases, so a "billion laughs" document of a few
  hundred bytes expands to billions of nodes once the configuration is
  copied or walked;
* recurses once per nesting level while composing, so a 5000-deep list ends
  in a ``RecursionError`` traceback.

:class:`StrictLoader` refuses all three with a :class:`yaml.YAMLError` that
names the line (and, for duplicates, the key). The limits are generous for
any real configuration: :data:`MAX_DEPTH` nesting levels and
:data:`MAX_EXPANDED_NODES` nodes once aliases are expanded.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

#: deepest nesting of mappings and lists (a run configuration uses at most 5).
MAX_DEPTH = 64
#: most nodes a document may hold with every alias expanded (a run configuration has a few hundred).
MAX_EXPANDED_NODES = 100_000


class LimitError(yaml.YAMLError):
    """A document exceeds :data:`MAX_DEPTH` or :data:`MAX_EXPANDED_NODES`, or repeats a key."""

    def __init__(self, problem: str, node: Node | None = None) -> None:
        self.problem = problem
        self.problem_mark = node.start_mark if node is not None else None
        super().__init__(problem)


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with duplicate keys, nesting depth and alias expansion bounded."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # noqa: D102 - PyYAML hook
        self._depth += 1
        if self._depth > MAX_DEPTH:
            event = self.peek_event()
            raise LimitError(f"nesting deeper than {MAX_DEPTH} levels", _MarkOnly(event.start_mark))
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Node) -> Any:  # noqa: D102 - PyYAML hook
        expanded = expanded_size(node)
        if expanded > MAX_EXPANDED_NODES:
            raise LimitError(f"aliases expand to more than {MAX_EXPANDED_NODES:,} nodes (an alias bomb?)", node)
        return super().construct_document(node)

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:  # noqa: D102 - PyYAML hook
        if isinstance(node, MappingNode):
            seen: dict[Any, Node] = {}
            for key_node, _ in node.value:  # explicit keys only: merged ('<<') ones may be overridden
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    raise ConstructorError(None, None, "a mapping key must be a scalar", key_node.start_mark) from None
                if key in seen:
                    first = seen[key].start_mark.line + 1
                    raise LimitError(f"duplicate key '{key}' (first given at line {first})", key_node)
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


class _MarkOnly:
    """A stand-in node carrying only a position, for :class:`LimitError`."""

    def __init__(self, mark: Any) -> None:
        self.start_mark = mark


def expanded_size(root: Node) -> int:
    """Number of nodes of the document rooted at ``root`` with every alias expanded (shared nodes counted each time).

    Memoised per node, so the count itself costs one visit per distinct node
    even when the expansion is astronomically large.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again is a recursive alias
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if children_done or not children:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_EXPANDED_NODES:  # stop early; the exact value no longer matters
                return sizes[id(node)]
            continue
        if id(node) in open_nodes:
            raise LimitError("an alias refers to a node that contains it (a recursive structure)", node)
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise LimitError("an alias refers to a node that contains it (a recursive structure)", child)
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def strict_load(stream: Any) -> Any:
    """Parse one YAML document with :class:`StrictLoader`."""
    loader = StrictLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
