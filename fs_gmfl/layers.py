"""The package's layers and its import graph, read from the syntax tree; the graph of docs/architecture.md.

Every module of ``fs_gmfl`` belongs to one layer of :data:`LAYERS` (lowest first) and imports only modules of
its own layer or of lower ones; :data:`PEERS` never import each other (the two hosts); and no module imports
itself back through others (no import cycle). An import counts wherever it stands, at module level or inside a
function; one under ``if TYPE_CHECKING:`` (annotations only, never executed) does not.

``python -m fs_gmfl.layers`` rewrites the generated block of ``docs/architecture.md`` (between
``<!-- layers -->`` and ``<!-- /layers -->``: the layers, a diagram and a table of which part imports which)
from the code; ``--check`` changes nothing and exits 1 when the page is out of date (``tests/test_layering.py``
runs the same check, and checks the rules above).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "fs_gmfl"
#: the command that refreshes the page (quoted in the test's failure message).
REFRESH_COMMAND = "python -m fs_gmfl.layers"
#: the page holding the generated block, relative to the repository root.
PAGE = Path("docs") / "architecture.md"
MARKER = re.compile(r"(<!-- layers -->\n)(.*?)(<!-- /layers -->)", re.DOTALL)

Graph = Mapping[str, set[str]]


@dataclass(frozen=True)
class Layer:
    """A layer: its name, its parts (module prefixes) and what it holds, in words."""

    name: str
    parts: tuple[str, ...]
    holds: str


#: the layers, lowest first. A module belongs to the layer of its longest matching part (``fs_gmfl`` itself
#: matches only the package's ``__init__``).
LAYERS = (
    Layer("leaves", ("fs_gmfl", "fs_gmfl.errors", "fs_gmfl.plots", "fs_gmfl.layers"),
          "named errors, plotting, this map of the layers; they import nothing of fs_gmfl"),
    Layer("declarations", ("fs_gmfl.config.fields",),
          "`opt()`: how a configuration key is declared, validated and documented"),
    Layer("core", ("fs_gmfl.core",),
          "messages and byte counting, the protocol, the method registry, one folder per method (pure torch + peft)"),
    Layer("config", ("fs_gmfl.config",), "the validated run configuration, the YAML loader, advice, doc tables"),
    Layer("methods", ("fs_gmfl.methods",), "building the method a configuration selects (both hosts use it)"),
    Layer("hosts.common", ("fs_gmfl.hosts.common",),
          "what every host shares: data, models, evaluation, sampling, state files, tensor wire checks, the resource pre-flight"),
    Layer("hosts", ("fs_gmfl.hosts", "fs_gmfl.hosts.sim", "fs_gmfl.hosts.fs"),
          "the embedded simulator and the FederatedScope adapter, peers"),
    Layer("hosts.flower", ("fs_gmfl.hosts.flower",),
          "the Flower host: the simulator's server loop with its clients behind a Flower Grid, Flower's client app"),
    Layer("commands", ("fs_gmfl.comm_estimate", "fs_gmfl.bench", "fs_gmfl.cli", "fs_gmfl.__main__"),
          "what `fs-gmfl` runs: byte estimates, benchmarks, the command line"),
)
#: parts of one layer that must not import each other.
PEERS = (("fs_gmfl.hosts.sim", "fs_gmfl.hosts.fs"), ("fs_gmfl.hosts.flower", "fs_gmfl.hosts.fs"))


# -- the import graph ---------------------------------------------------------------------------------------
def package_modules(package_dir: Path) -> dict[str, Path]:
    """Every module of the package in ``package_dir``, by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.orelse if _is_type_checking(node) else ast.iter_child_nodes(node))


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name (and ``module.attribute``) ``path`` imports at run time, at any depth of its syntax tree."""
    names: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package=path.name == "__init__.py")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _absolute(node: ast.ImportFrom, module: str, *, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at run time (a module importing its own parent package left
    out: the parent is already being imported)."""
    modules = package_modules(package_dir)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {_longest_module(name, modules) for name in imported_names(path, module)}
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    return graph


def _longest_module(name: str, modules: Mapping[str, Path]) -> str:
    """The longest prefix of ``name`` that is a module of the package ('' if none)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def cycles(graph: Graph) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    found: list[list[str]] = []
    for root in sorted(graph):
        if root not in index:
            _strong_components(graph, root, index, low, found)
    return sorted(found)


def _strong_components(graph: Graph, root: str, index: dict[str, int], low: dict[str, int],
                       found: list[list[str]]) -> None:
    """Tarjan's algorithm from ``root`` (iterative, so no recursion limit); appends the components to ``found``."""
    stack: list[str] = []
    on_stack: set[str] = set()
    work = [(root, iter(sorted(graph.get(root, ()))))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
        node, children = work[-1]
        child = next(children, None)
        if child is not None:
            if child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
            continue
        work.pop()
        if work:
            low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))


# -- layers ---------------------------------------------------------------------------------------------------
def part_of(module: str) -> str | None:
    """The layer part ``module`` belongs to (its longest matching part), ``None`` if no layer claims it."""
    matches = [part for layer in LAYERS for part in layer.parts
               if module == part or (part != PACKAGE and module.startswith(part + "."))]
    return max(matches, key=len, default=None)


def layer_index(part: str) -> int:
    """The position in :data:`LAYERS` of the layer holding ``part``."""
    return next(i for i, layer in enumerate(LAYERS) if part in layer.parts)


def violations(graph: Graph) -> list[str]:
    """Every broken rule: a module no layer claims, an import of a higher layer, an import between peers."""
    found = [f"{module} belongs to no layer (add it to fs_gmfl.layers.LAYERS)" for module in sorted(graph)
             if part_of(module) is None]
    peers = {frozenset(pair) for pair in PEERS}
    for module in sorted(graph):
        for target in sorted(graph[module]):
            source_part, target_part = part_of(module), part_of(target)
            if source_part is None or target_part is None:
                continue
            if layer_index(target_part) > layer_index(source_part):
                found.append(f"{module} imports {target}, a higher layer ({LAYERS[layer_index(target_part)].name})")
            elif frozenset((source_part, target_part)) in peers:
                found.append(f"{module} imports {target}, a peer")
    return found


def part_graph(graph: Graph) -> dict[str, set[str]]:
    """Layer part -> the other parts its modules import."""
    parts: dict[str, set[str]] = {part: set() for layer in LAYERS for part in layer.parts}
    for module, targets in graph.items():
        source = part_of(module)
        for target in map(part_of, targets):
            if source is not None and target is not None and target != source:
                parts[source].add(target)
    return parts


# -- the generated block ------------------------------------------------------------------------------------
def render(graph: Graph) -> str:
    """The generated block: the layers with what each may import, a diagram, and which part imports which."""
    parts = part_graph(graph)
    return "\n".join([*_layer_table(), "", *_diagram(parts), "", *_import_table(parts), ""])


def _layer_table() -> list[str]:
    rows = ["| layer | parts | holds | may import |", "|---|---|---|---|"]
    for i, layer in reversed(list(enumerate(LAYERS))):
        allowed = ["its own layer" + (" (peers excepted)" if _has_peers(layer) else "")]
        allowed += [lower.name for lower in reversed(LAYERS[:i])]
        rows.append(f"| {layer.name} | {', '.join(f'`{p}`' for p in layer.parts)} | {layer.holds} | "
                    f"{', '.join(allowed)} |")
    return rows


def _has_peers(layer: Layer) -> bool:
    return any(part in pair for pair in PEERS for part in layer.parts)


def _diagram(parts: Mapping[str, set[str]]) -> list[str]:
    """A mermaid flowchart, one box per layer (highest on top), one arrow per importing part."""
    node = {part: f"n{i}" for i, part in enumerate(parts)}
    lines = ["```mermaid", "flowchart TD"]
    for i, layer in reversed(list(enumerate(LAYERS))):
        lines.append(f"  subgraph L{i}[\"{layer.name}\"]")
        lines.extend(f"    {node[part]}[\"{part}\"]" for part in layer.parts)
        lines.append("  end")
    lines.extend(f"  {node[source]} --> {node[target]}" for source in parts for target in sorted(parts[source]))
    return [*lines, "```"]


def _import_table(parts: Mapping[str, set[str]]) -> list[str]:
    rows = ["| part | layer | imports |", "|---|---|---|"]
    for source in parts:
        imported = ", ".join(f"`{t}`" for t in sorted(parts[source], key=lambda t: (layer_index(t), t))) or "-"
        rows.append(f"| `{source}` | {LAYERS[layer_index(source)].name} | {imported} |")
    return rows


def refresh_text(text: str, block: str) -> str:
    """``text`` with its generated block replaced by ``block``.

    Raises:
        ValueError: ``text`` has no ``<!-- layers -->`` ... ``<!-- /layers -->`` block.
    """
    if not MARKER.search(text):
        raise ValueError("no <!-- layers --> ... <!-- /layers --> block")
    return MARKER.sub(lambda m: m.group(1) + block + m.group(3), text, count=1)


def repository_root() -> Path:
    """The project root (the directory holding the package and ``docs/``)."""
    return Path(__file__).resolve().parents[1]


def is_stale(root: Path) -> bool:
    """Whether ``root``'s page differs from what the code of ``root``'s package generates."""
    text = (root / PAGE).read_text(encoding="utf-8")
    return refresh_text(text, render(import_graph(root / PACKAGE))) != text


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with ``--check`` only verify) the generated block of docs/architecture.md."""
    parser = argparse.ArgumentParser(prog=REFRESH_COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the page is out of date")
    parser.add_argument("--root", type=Path, default=None, help="project root (default: this package's)")
    args = parser.parse_args(argv)
    root = args.root or repository_root()
    page = root / PAGE
    if args.check:
        if is_stale(root):
            print(f"out of date: {PAGE}; run `{REFRESH_COMMAND}` to refresh it", file=sys.stderr)
            return 1
        return 0
    page.write_text(refresh_text(page.read_text(encoding="utf-8"), render(import_graph(root / PACKAGE))),
                    encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
