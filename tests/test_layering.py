"""The package's layers import only downwards (issue 15, item 4): hosts are peers over the cores.

core (the algorithm cores and the protocol) imports no other fs_gmfl layer except the option-declaring helpers
of ``fs_gmfl.config.fields`` (each method declares its own config section with them); config imports only core;
hosts.common (what both hosts share) imports no host; the simulator and the FederatedScope adapter never
import each other. Function-local imports count too (read from the syntax tree, not from ``sys.modules``); imports under
``if TYPE_CHECKING:`` (annotations only, never executed) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fs_gmfl"

#: layer (a module prefix) -> fs_gmfl module prefixes it must never import.
FORBIDDEN = {
    "fs_gmfl.core": ("fs_gmfl.config.schema", "fs_gmfl.config.loader", "fs_gmfl.config.faults", "fs_gmfl.hosts", "fs_gmfl.bench", "fs_gmfl.cli", "fs_gmfl.methods",
                     "fs_gmfl.preflight", "fs_gmfl.comm_estimate", "fs_gmfl.plots"),
    "fs_gmfl.config": ("fs_gmfl.hosts", "fs_gmfl.bench", "fs_gmfl.cli", "fs_gmfl.methods", "fs_gmfl.preflight",
                       "fs_gmfl.comm_estimate"),
    "fs_gmfl.hosts.common": ("fs_gmfl.hosts.sim", "fs_gmfl.hosts.fs", "fs_gmfl.bench", "fs_gmfl.cli"),
    "fs_gmfl.hosts.sim": ("fs_gmfl.hosts.fs", "fs_gmfl.bench", "fs_gmfl.cli"),
    "fs_gmfl.hosts.fs": ("fs_gmfl.hosts.sim", "fs_gmfl.bench", "fs_gmfl.cli"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        children = node.orelse if is_type_checking_block(node) else list(ast.iter_child_nodes(node))
        stack.extend(children)


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports at run time, at any depth of its syntax tree."""
    names: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(layer: str) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        if not within(mod, layer):
            continue
        for imported in sorted(imported_modules(path)):
            for banned in FORBIDDEN[layer]:
                if within(imported, banned):
                    found.append(f"{mod} imports {imported}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downwards(layer):
    assert violations(layer) == []


def test_the_checker_sees_function_local_imports(tmp_path):
    """The checker itself: an import inside a function body is found (so the test above can fail)."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fs_gmfl.bench\n"
                      "def f():\n    from fs_gmfl.hosts.sim.runner import Simulation\n    import fs_gmfl.hosts.fs\n")
    found = imported_modules(source)
    assert {"fs_gmfl.hosts.sim.runner", "fs_gmfl.hosts.sim.runner.Simulation", "fs_gmfl.hosts.fs"} <= found
    assert "fs_gmfl.bench" not in found


def test_simulator_and_federatedscope_host_are_peers_under_hosts():
    assert (PACKAGE / "hosts" / "sim" / "runner.py").is_file()
    assert (PACKAGE / "hosts" / "fs" / "workers.py").is_file()
    assert not (PACKAGE / "sim").exists()
