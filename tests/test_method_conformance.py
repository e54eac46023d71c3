"""Conformance suite: every registered method (and the toy method of ``tests/toy_method``) obeys the contract.

Each check is parametrised over the registry, so a new method is covered as
soon as its ``spec.py`` exists: its example overrides validate, a two-round
simulation completes, a malformed uplink is rejected without touching the
global state, its aggregation is a streaming fold (the same state from a list
or a one-shot generator, no reply kept once folded), and its byte estimator
(if any) reports both directions.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
import weakref

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


#: extra overrides so that the streaming checks reach every per-client value a method keeps (FedHFT: clustering).
STREAMING_EXTRA = {"fedhft": ("fedhft.num_clusters", "2", "fedhft.cluster_warmup_rounds", "0")}


def round_one_uplinks(tmp_path, method: str) -> tuple[Simulation, list[Reply]]:
    """A set-up simulation whose strategy configured round 1 for clients 0-3, and their real uplinks in the
    order 0, 3, 1, 2, client 3's made malformed (one NaN)."""
    cfg = config(tmp_path, method, "federate.sample_client_num", "4", *STREAMING_EXTRA.get(method, ()))
    sim = Simulation(cfg, quiet=True)
    sim.setup()
    downlinks = sim.method.strategy.configure_round(1, [0, 1, 2, 3])
    replies = [Reply(c, sim._fit_client(1, c, downlinks[c].detached_copy())) for c in (0, 3, 1, 2)]
    key = next(k for k, v in replies[1].message.tensors.items() if v.is_floating_point() and v.numel())
    replies[1].message.tensors[key].view(-1)[0] = float("nan")
    return sim, replies


def one_at_a_time(replies: list[Reply], released: list[bool]):
    """Yield fresh copies of ``replies``; before making the next, check the previous copy is gone (refcounts only)."""
    previous: list[weakref.ref] = []
    for reply in replies:
        released.append(all(ref() is None for ref in previous))
        copied = Reply(reply.client_id, reply.message.detached_copy())
        previous = [weakref.ref(copied.message)] + [weakref.ref(t) for t in copied.message.tensors.values()]
        yield copied
        del copied
    released.append(all(ref() is None for ref in previous))


def assert_same_state(first, second) -> None:
    """Bit-identical global adapters, evaluation adapters and ``state_dict`` tensors."""
    def flat(value, prefix=""):
        if isinstance(value, dict):
            return {k2: v2 for k, v in value.items() for k2, v2 in flat(v, f"{prefix}{k}/").items()}
        if isinstance(value, (list, tuple)):
            return {k2: v2 for i, v in enumerate(value) for k2, v2 in flat(v, f"{prefix}{i}/").items()}
        return {prefix: value}

    for a, b in ((first.global_adapter(), second.global_adapter()),
                 (flat(first.evaluation_adapters()), flat(second.evaluation_adapters())),
                 (flat(first.state_dict()), flat(second.state_dict()))):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k


@pytest.mark.parametrize("method", METHODS)
def test_streamed_replies_fold_like_a_list_and_are_released(tmp_path, method):
    """A one-shot generator gives the state a list gives, bit for bit; each reply is released once folded;
    the malformed reply among them is rejected and changes nothing (same state as without it)."""
    # Prepare
    sim, replies = round_one_uplinks(tmp_path, method)
    listed, streamed, good_only = (copy.deepcopy(sim.method.strategy) for _ in range(3))
    released: list[bool] = []
    # Execute
    listed_report = listed.aggregate(1, replies)
    streamed_report = streamed.aggregate(1, one_at_a_time(replies, released))
    good_only.aggregate(1, [r for i, r in enumerate(replies) if i != 1])
    # Assert
    assert released == [True] * (len(replies) + 1)
    assert streamed_report == listed_report
    assert listed_report.accepted == [0, 1, 2] and list(listed_report.rejected) == [3]
    assert_same_state(streamed, listed)
    assert_same_state(good_only, listed)
    before = sim.method.strategy.global_adapter()
    after = listed.global_adapter()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the round did change the model


@pytest.mark.parametrize("method", METHODS)
def test_replies_pushed_on_arrival_fold_like_aggregate(tmp_path, method):
    """``start_aggregation`` / ``add`` / ``finish`` (how a host folds messages on arrival) equals ``aggregate``."""
    # Prepare
    sim, replies = round_one_uplinks(tmp_path, method)
    pulled, pushed = copy.deepcopy(sim.method.strategy), copy.deepcopy(sim.method.strategy)
    # Execute
    pulled_report = pulled.aggregate(1, replies)
    aggregation = pushed.start_aggregation(1)
    reasons = [aggregation.add(reply) for reply in replies]
    pushed_report = aggregation.finish()
    # Assert
    assert [r is None for r in reasons] == [True, False, True, True]
    assert pushed_report == pulled_report
    assert_same_state(pushed, pulled)
    with pytest.raises(RuntimeError, match="already aggregated"):
        aggregation.add(replies[0])
