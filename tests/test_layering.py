"""The package's layers import only downwards, the hosts are peers, and nothing imports itself back (issue 24).

The layers and the checks are :mod:`fs_gmfl.layers`: every module belongs to one layer and imports only its own
layer or lower ones; the simulator and the FederatedScope adapter never import each other; the import graph has
no cycle. Function-local imports count (read from the syntax tree, not from ``sys.modules``); imports under
``if TYPE_CHECKING:`` (annotations only, never executed) do not. docs/architecture.md shows the graph, generated.
"""

from __future__ import annotations

from pathlib import Path

from fs_gmfl import layers

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fs_gmfl"


def test_the_package_has_no_import_cycle():
    cycles = layers.cycles(layers.import_graph(PACKAGE))
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_every_module_has_a_layer_and_imports_only_downwards():
    assert layers.violations(layers.import_graph(PACKAGE)) == []


def test_architecture_page_shows_the_current_import_graph():
    assert not layers.is_stale(ROOT), f"docs/architecture.md is out of date: run `{layers.REFRESH_COMMAND}`"


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A package ``fs_gmfl`` under ``root`` with the given module sources (an ``__init__`` in every folder)."""
    for name, source in {"__init__.py": "", **files}.items():
        path = root / "fs_gmfl" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(source, encoding="utf-8")
    return root / "fs_gmfl"


def test_the_checker_sees_function_local_imports_and_skips_type_checking(tmp_path):
    """The checker itself: an import inside a function body is found, one under TYPE_CHECKING is not."""
    package = write_package(tmp_path, {"probe.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fs_gmfl.bench\n"
        "def f():\n    from fs_gmfl.hosts.sim.runner import Simulation\n    import fs_gmfl.hosts.fs\n"),
        "hosts/sim/runner.py": "", "hosts/fs/__init__.py": "", "bench/__init__.py": ""})
    graph = layers.import_graph(package)
    assert graph["fs_gmfl.probe"] == {"fs_gmfl.hosts.sim.runner", "fs_gmfl.hosts.fs"}


def test_the_checker_finds_a_cycle_through_a_function_local_import(tmp_path):
    """errors -> core.message at module level, core.message -> errors inside a function: one cycle."""
    package = write_package(tmp_path, {"errors.py": "from fs_gmfl.core.message import Message\n",
                                       "core/message.py": "def f():\n    from fs_gmfl import errors\n"})
    assert layers.cycles(layers.import_graph(package)) == [["fs_gmfl.core.message", "fs_gmfl.errors"]]


def test_the_checker_names_upward_imports_peer_imports_and_unplaced_modules(tmp_path):
    package = write_package(tmp_path, {"core/x.py": "import fs_gmfl.methods\n", "methods.py": "",
                                       "hosts/sim/a.py": "from fs_gmfl.hosts.fs import b\n", "hosts/fs/b.py": "",
                                       "newcomer.py": ""})
    found = layers.violations(layers.import_graph(package))
    assert "fs_gmfl.core.x imports fs_gmfl.methods, a higher layer (methods)" in found
    assert "fs_gmfl.hosts.sim.a imports fs_gmfl.hosts.fs.b, a peer" in found
    assert any(line.startswith("fs_gmfl.newcomer belongs to no layer") for line in found)


def test_check_mode_reports_a_stale_page(tmp_path, capsys):
    """``--check`` exits 1 on a stale page and names the command; the rewrite makes it current."""
    (tmp_path / "docs").mkdir()
    write_package(tmp_path, {"errors.py": "", "core/__init__.py": "from fs_gmfl import errors\n"})
    (tmp_path / layers.PAGE).write_text("intro\n<!-- layers -->\nold\n<!-- /layers -->\nend\n", encoding="utf-8")
    assert layers.main(["--check", "--root", str(tmp_path)]) == 1
    assert layers.REFRESH_COMMAND in capsys.readouterr().err
    assert layers.main(["--root", str(tmp_path)]) == 0
    assert layers.main(["--check", "--root", str(tmp_path)]) == 0
    text = (tmp_path / layers.PAGE).read_text(encoding="utf-8")
    assert text.startswith("intro\n<!-- layers -->\n| layer |") and text.endswith("<!-- /layers -->\nend\n")
    assert "| `fs_gmfl.core` | core | `fs_gmfl.errors` |" in text


def test_simulator_and_federatedscope_host_are_peers_under_hosts():
    assert (PACKAGE / "hosts" / "sim" / "runner.py").is_file()
    assert (PACKAGE / "hosts" / "fs" / "workers.py").is_file()
    assert not (PACKAGE / "sim").exists()
