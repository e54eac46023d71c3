"""Conformance suite: every registered method (and the toy method of ``tests/toy_method``) obeys the contract.

Each check is parametrised over the registry, so a new method is covered as
soon as its ``spec.py`` exists: its example overrides validate, a two-round
simulation completes, a malformed uplink is rejected without touching the
global state, and its byte estimator (if any) reports both directions.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from fs_gmfl.comm_estimate import estimate
from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.message import Message, Reply
from fs_gmfl.core.registry import method_specs, register_method, spec_of, unregister_method
from fs_gmfl.hosts.sim.runner import Simulation
from tests.conftest import tiny_config
from tests.toy_method.spec import TOY

pytestmark = pytest.mark.usefixtures("single_thread", "toy_registered")

METHODS = [spec.name for spec in method_specs()] + [TOY.name]


@pytest.fixture
def toy_registered():
    """The toy method, registered for the duration of one test."""
    register_method(TOY)
    yield
    unregister_method(TOY.name)


def config(tmp_path, method: str, *extra: str) -> RunConfig:
    return tiny_config(tmp_path, *spec_of(method).example_overrides, *extra)


@pytest.mark.parametrize("method", METHODS)
def test_spec_is_complete_and_its_example_validates(tmp_path, method):
    """The spec resolves its callables, names a real config section, and its overrides select it."""
    spec = spec_of(method)
    assert callable(spec.builder())
    for hook in (spec.config_check(), spec.estimator(), spec.host_config_check()):
        assert hook is None or callable(hook)
    sections = typing.get_type_hints(RunConfig)
    if spec.config_section is not None:
        assert dataclasses.is_dataclass(spec.config_class) and sections[spec.config_section] is spec.config_class
    assert config(tmp_path, method).method == method
    for alias in spec.aliases:
        assert tiny_config(tmp_path, "federate.method", alias).method == method


@pytest.mark.parametrize("method", METHODS)
def test_two_rounds_in_the_simulator(tmp_path, method):
    """Two rounds run, every sampled client's uplink is accepted, bytes are counted both ways."""
    summary = Simulation(config(tmp_path, method, "federate.total_round_num", "2"), quiet=True).run()
    assert summary["rounds"] == 2 and summary["rejected_updates"]["total"] == 0
    assert summary["comm"]["uplink_bytes"] > 0 and summary["comm"]["downlink_bytes"] > 0
    assert summary["final"]


@pytest.mark.parametrize("method", METHODS)
def test_malformed_uplink_is_rejected_and_changes_nothing(tmp_path, method):
    """A real uplink with one NaN entry is rejected; the global adapter stays bit-identical."""
    sim = Simulation(config(tmp_path, method), quiet=True)
    sim.setup()
    strategy = sim.method.strategy
    before = strategy.global_adapter()
    downlinks = strategy.configure_round(1, [0])
    uplink = sim._fit_client(1, 0, downlinks[0].detached_copy())
    tensors = {k: v.clone() for k, v in uplink.tensors.items()}
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel())
    tensors[key].view(-1)[0] = float("nan")
    report = strategy.aggregate(1, [Reply(0, Message(tensors, uplink.control))])
    assert report.accepted == [] and list(report.rejected) == [0]
    after = strategy.global_adapter()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("method", [m for m in METHODS if m == TOY.name or spec_of(m).estimate is not None])
def test_byte_estimate_reports_both_directions(tmp_path, method):
    """``fs-gmfl comm`` works for the method: per-round uplink and downlink bytes are positive."""
    per_round = estimate(config(tmp_path, method))["per_round"]
    assert per_round["uplink_bytes"] > 0 and per_round["downlink_bytes"] > 0
