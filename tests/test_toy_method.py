"""The toy method of ``tests/toy_method``: added in its own folder only, found through an entry point."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import pytest

from fs_gmfl.comm_estimate import estimate
from fs_gmfl.core import registry
from fs_gmfl.hosts.fs.config import owned_methods
from fs_gmfl.sim.runner import Simulation
from tests.conftest import tiny_config

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
    allowed = {"tests/toy_method/spec.py", "tests/toy_method/strategy.py", "tests/test_toy_method.py",
               "tests/test_method_conformance.py"}
    assert set(hits) <= allowed, sorted(set(hits) - allowed)


def test_registering_a_taken_name_fails():
    """A plug-in cannot take over a built-in name or alias."""
    spec = registry.MethodSpec(name="mine", aliases=("fedavg",), build=lambda ctx: None)
    with pytest.raises(KeyError, match="'fedavg' is already registered"):
        registry.register_method(spec)
