"""The toy method of ``tests/toy_method``: added in its own folder only, found through an entry point."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fs_gmfl.comm_estimate import estimate
from fs_gmfl.core import registry
from fs_gmfl.hosts.fs.config import owned_methods
from fs_gmfl.hosts.sim.runner import Simulation
from tests.conftest import TINY, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_from_entry_point(monkeypatch):
    """A fresh registry that discovers the built-ins plus one installed plug-in: the toy method."""
    entry = importlib.metadata.EntryPoint(name="toy_head", value="tests.toy_method.spec:SPECS",
                                          group=registry.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [entry] if kw.get("group") == registry.ENTRY_POINT_GROUP else real(**kw))
    monkeypatch.setattr(registry, "_SPECS", {})
    monkeypatch.setattr(registry, "_BY_LABEL", {})
    monkeypatch.setattr(registry, "_DISCOVERED", False)
    yield


def test_entry_point_adds_the_method_everywhere(tmp_path, toy_from_entry_point):
    """Config choices, the simulator and ``fs-gmfl comm`` know it; the FederatedScope host does not claim it."""
    assert "toy_head" in [spec.name for spec in registry.method_specs()]
    assert {"fedit", "hafl", "fedhft", "fedkrso", "fft"} <= set(owned_methods())
    assert "toy_head" not in owned_methods()
    cfg = tiny_config(tmp_path, "federate.method", "toy_head", "federate.total_round_num", "1")
    summary = Simulation(cfg, quiet=True).run()
    counted = summary["comm"]  # one round
    estimated = estimate(cfg)["per_round"]
    assert (estimated["uplink_bytes"], estimated["downlink_bytes"]) == (counted["uplink_bytes"],
                                                                         counted["downlink_bytes"])


def test_comm_command_and_preflight_serve_the_plugin(tmp_path, toy_from_entry_point, capsys):
    """`fs-gmfl comm` runs the plug-in's own estimator (named by its spec, nothing in fs_gmfl names the method),
    and the resource pre-flight accepts it."""
    from fs_gmfl.cli import main
    from fs_gmfl.hosts.common.preflight import check_run

    cfg_file = tmp_path / "toy.yaml"
    cfg_file.write_text("federate:\n  method: toy_head\n", encoding="utf-8")
    assert main(["comm", "--cfg", str(cfg_file), *TINY, "outdir", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = tiny_config(tmp_path, "federate.method", "toy_head")
    assert printed["method"] == "toy_head" and printed["per_round"] == estimate(cfg)["per_round"]
    assert printed["per_round"]["uplink_bytes"] > printed["per_round"]["downlink_bytes"] > 0
    assert check_run(cfg) == []


def test_unknown_method_error_lists_the_plugin(tmp_path, toy_from_entry_point):
    """A misspelt method is one clear error that names the key, the value and every method, plug-ins included."""
    from fs_gmfl.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, "federate.method", "toy_heads")
    assert "federate.method" in str(err.value) and "'toy_heads'" in str(err.value) and "'toy_head'" in str(err.value)


def test_the_toy_method_touches_no_file_outside_its_folder():
    """Nothing in the package or the other tests names the toy method."""
    hits = subprocess.run(["grep", "-rl", "toy_head", "fs_gmfl", "tests", "--include=*.py"], cwd=ROOT,
                          capture_output=True, text=True).stdout.split()
    outside = {hit for hit in hits if not hit.startswith("tests/toy_method/")}
    assert outside <= {"tests/test_toy_method.py", "tests/test_method_conformance.py"}, sorted(outside)


def test_registering_a_taken_name_fails():
    """A plug-in cannot take over a built-in name or alias."""
    spec = registry.MethodSpec(name="mine", aliases=("fedavg",), build=lambda ctx: None)
    with pytest.raises(KeyError, match="'fedavg' is already registered"):
        registry.register_method(spec)


PLUGIN_WITH_SECTION = """
import importlib.metadata, json, sys
entry = importlib.metadata.EntryPoint(name="toy_head_tuned", value="tests.toy_method.spec:TOY_TUNED",
                                      group="fs_gmfl.methods")
real = importlib.metadata.entry_points
importlib.metadata.entry_points = lambda **kw: [entry] if kw.get("group") == "fs_gmfl.methods" else real(**kw)
from fs_gmfl.cli import main
from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.sim.runner import Simulation
from tests.conftest import TINY, tiny_config
cfg = tiny_config(sys.argv[1], "federate.method", "toy_head_tuned", "toy_head_tuned.server_lr", "0.5",
                  "federate.total_round_num", "1")
summary = Simulation(cfg, quiet=True).run()
try:
    tiny_config(sys.argv[1], "toy_head_tuned.server_lr", "2")
    error = ""
except ConfigError as err:
    error = str(err)
main(["keys", "toy_head_tuned"])
print(json.dumps({"server_lr": cfg.toy_head_tuned.server_lr, "accepted": summary["rejected_updates"]["total"] == 0,
                  "error": error}))
"""


def test_a_plugin_brings_its_own_config_section(tmp_path):
    """An entry-point method with a YAML section: the schema grows the section, validates it, lists it in keys."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FS_GMFL_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PLUGIN_WITH_SECTION, str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    *keys, last = result.stdout.strip().splitlines()
    outcome = json.loads(last)
    assert outcome["server_lr"] == 0.5 and outcome["accepted"]
    assert "'toy_head_tuned.server_lr'" in outcome["error"] and "(0.0, 1.0]" in outcome["error"]
    assert keys[0].startswith("toy_head_tuned.server_lr = 1.0")


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "My-Method"}, "lower-case letters"),
    ({"name": "mine", "hosts": ("sim", "ray")}, "unknown hosts"),
    ({"name": "mine", "config_section": "mine"}, "config_section and config_class go together"),
])
def test_a_malformed_spec_is_refused(kwargs, message):
    """Names, hosts and the config pair are checked when the spec is written, not when a run starts."""
    with pytest.raises(ValueError, match=message):
        registry.MethodSpec(build=lambda ctx: None, **kwargs)


def test_unknown_method_in_build_names_the_known_ones():
    """spec_of: a KeyError listing the registered methods."""
    with pytest.raises(KeyError, match=r"no method registered as 'nope' \(known: \[.*'fedhft', 'fedit'"):
        registry.spec_of("nope")


def test_scenario_tables_cover_a_plugin_method(toy_from_entry_point):
    """The fault, checkpoint, validation and causal-LM scenario tables are built from the registry, so a
    method registered by a plug-in gets a case with its declared example overrides, without editing them."""
    from tests.method_cases import registered_cases

    cases = registered_cases(adjust={"fedkrso": ["fedkrso.interval", "2"]}, variants={"gmfl": ["gmfl.use", "True"]})
    toy = next(spec for spec in registry.method_specs() if spec.name == "toy_head")
    assert cases["toy_head"] == list(toy.example_overrides) and toy.example_overrides
    assert cases["fedkrso"][-2:] == ["fedkrso.interval", "2"] and cases["gmfl"] == ["gmfl.use", "True"]
    with pytest.raises(KeyError, match="unregistered"):
        registered_cases(adjust={"no_such_method": []})
