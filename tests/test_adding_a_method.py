"""docs/adding_a_method.md's worked example (FedProx) as written: every code block is the file it names, and the
blocks, written into a package outside fs_gmfl and registered through the entry-point group, work in the
``fs-gmfl keys``, ``comm`` and ``run`` commands exactly as the built-in does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fs_gmfl.comm_estimate import estimate
from fs_gmfl.hosts.sim.runner import Simulation
from tests.conftest import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding_a_method.md"
FOLDER = "fs_gmfl/core/fedprox"
#: a code block of the worked example: its first line names the file it is.
BLOCK = re.compile(r"```python\n# (?P<path>fs_gmfl/core/fedprox/[\w.]+)\n(?P<code>.*?)```", re.DOTALL)
#: the plug-in's package and method name (the built-in's name is taken).
PLUGIN, NAME = "fedprox_example", "fedprox_ext"
ONE_ROUND = [*TINY, "federate.total_round_num", "1", "eval.freq", "1"]


def doc_blocks() -> dict[str, str]:
    """``{path: code}`` of the worked example's blocks, as the page shows them."""
    return {m["path"]: m["code"] for m in BLOCK.finditer(DOC.read_text(encoding="utf-8"))}


def as_plugin(code: str) -> str:
    """A built-in file as the plug-in's: imports from the plug-in package, the method (and section) renamed."""
    return re.sub(r"\bfedprox\b", NAME, code.replace("fs_gmfl.core.fedprox", PLUGIN))


def test_every_block_is_the_file_it_names_and_every_file_is_shown():
    """The page shows the whole folder, each file verbatim."""
    blocks = doc_blocks()
    assert set(blocks) == {f"{FOLDER}/{p.name}" for p in (ROOT / FOLDER).glob("*.py")}
    for path, code in blocks.items():
        assert code == (ROOT / path).read_text(encoding="utf-8"), f"{path} differs from its block in {DOC.name}"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """A directory holding the plug-in package written from the page and its installed metadata (entry point)."""
    site = tmp_path_factory.mktemp("site")
    package = site / PLUGIN
    package.mkdir()
    for path, code in doc_blocks().items():
        (package / Path(path).name).write_text(as_plugin(code), encoding="utf-8")
    info = site / f"{PLUGIN}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[fs_gmfl.methods]\n{NAME} = {PLUGIN}.spec:SPECS\n", encoding="utf-8")
    (site / "plugin.yaml").write_text(f"federate:\n  method: {NAME}\n{NAME}:\n  mu: 0.1\n", encoding="utf-8")
    return site


def fs_gmfl(site: Path, *args: str) -> str:
    """``fs-gmfl ARGS`` in a fresh process that finds the plug-in on its path; its standard output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "FS_GMFL_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "fs_gmfl", *args], cwd=site, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def builtin(tmp_path: Path, *overrides: str):
    """The tiny one-round configuration of the built-in FedProx with mu 0.1."""
    return tiny_config(tmp_path, "federate.method", "fedprox", "fedprox.mu", "0.1", "federate.total_round_num", "1",
                       "eval.freq", "1", *overrides)


def test_the_plugin_lists_its_keys(plugin_site):
    """``fs-gmfl keys fedprox_ext``: its one key with the default and help of the page's config block."""
    assert fs_gmfl(plugin_site, "keys", NAME).startswith(f"{NAME}.mu = 0.01")


def test_the_plugin_estimates_fedits_bytes(plugin_site, tmp_path):
    """``fs-gmfl comm``: the same bytes per round as the built-in FedProx (FedIT's)."""
    out = json.loads(fs_gmfl(plugin_site, "comm", "--cfg", "plugin.yaml", *ONE_ROUND))
    assert out["method"] == NAME
    assert out["per_round"] == estimate(builtin(tmp_path))["per_round"]


def test_the_plugin_runs_one_round_like_the_builtin(plugin_site, tmp_path, single_thread):
    """``fs-gmfl run``: one round, nothing rejected, and the same bytes and final metrics as the built-in."""
    fs_gmfl(plugin_site, "run", "--cfg", "plugin.yaml", "--quiet", *ONE_ROUND, "outdir", str(tmp_path / "plugin"),
            "expname", "run")
    summary = json.loads((tmp_path / "plugin" / "run" / "summary.json").read_text(encoding="utf-8"))
    expected = Simulation(builtin(tmp_path / "builtin", "expname", "run"), quiet=True).run()
    assert summary["method"] == NAME and summary["rejected_updates"]["total"] == 0
    assert summary["comm"] == expected["comm"] and summary["final"] == expected["final"]


def test_the_plugin_runs_one_round_under_federatedscope(plugin_site, tmp_path):
    """``fs-gmfl fs-run``: the plug-in, found through the entry point, runs one round of a both-hosts YAML under
    FederatedScope with every update accepted (skipped where FederatedScope is not importable)."""
    pytest.importorskip("federatedscope", reason="FederatedScope (branch llm) is not installed: FederatedScope host "
                        "tests skipped")
    cfg = ROOT / "yaml_configs" / "fs" / "gmfl_fedit_tiny_bert_both_hosts.yaml"
    fs_gmfl(plugin_site, "fs-run", "--cfg", str(cfg), "federate.method", NAME, f"{NAME}.mu", "0.1", "gmfl.use",
            "False", "federate.total_round_num", "1", "outdir", str(tmp_path), "expname", "plugin")
    summary = json.loads((tmp_path / "plugin" / "summary.json").read_text(encoding="utf-8"))
    assert summary["host"] == "federatedscope" and summary["method"] == NAME
    assert summary["accepted_updates"] == 3 and summary["rejected_updates"]["total"] == 0
