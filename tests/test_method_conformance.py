"""Conformance suite: every registered method (and the toy method of ``tests/toy_method``) obeys the contract.

Each check is parametrised over the registry, so a new method is covered as
soon as its ``spec.py`` exists: its example overrides validate, a two-round
simulation completes, a malformed uplink is rejected without touching the
global state, its aggregation is a streaming fold (the same state from a list
or a one-shot generator, no reply kept once folded), and its byte estimator
(if any) reports both directions.

Behavioural checks against independent values: a reply sent twice or from an
unsampled client folds nothing; a round of real uplinks equals the method's
list-form reference (``tests/reference_aggregation.py``) over exactly the
accepted replies (FedAvg of the uploads by default; HAFL per component over
the clients that trained it, FedKRSO through the seeded projections, FedHFT
the masked cluster mixture); an uplink carries only what the client's plan
trained (and FedHFT exactly the kept rows of the client's level).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
import weakref

import pytest
import torch
from torch import Tensor

from fs_gmfl.comm_estimate import estimate
from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.adapter import adapter_state
from fs_gmfl.core.fedhft.wire import decode_rows
from fs_gmfl.core.fedkrso import wire as krso_wire
from fs_gmfl.core.hafl.ops import ComponentUpdate
from fs_gmfl.core.hafl.wire import INDICES
from fs_gmfl.core.message import Message, Reply
from fs_gmfl.core.protocol import LocalPlan, Strategy
from fs_gmfl.core.registry import method_specs, register_method, spec_of, unregister_method
from fs_gmfl.hosts.sim.runner import Simulation
from tests import reference_aggregation as reference
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


def round_one_uplinks(tmp_path, method: str, *extra: str) -> tuple[Simulation, list[Reply]]:
    """A set-up simulation whose strategy configured round 1 for clients 0-3, and their real uplinks in the
    order 0, 3, 1, 2, client 3's made malformed (one NaN)."""
    cfg = config(tmp_path, method, "federate.sample_client_num", "4", *STREAMING_EXTRA.get(method, ()), *extra)
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


# -- screening: a reply counts once, and only from a sampled client ------------------------------------------------
def intruder_round(tmp_path, method: str, intruder: str) -> tuple[Strategy, list[Reply], Reply]:
    """A strategy that sampled clients 0 and 1 for round 1, their real replies, and an intruder reply.

    ``duplicate``: client 0's reply sent again. ``unsampled``: a real reply of client 2, trained from the
    downlink a copy of the strategy wrote for it (so only the sampling makes it wrong).
    """
    sim = Simulation(config(tmp_path, method, "federate.sample_client_num", "2"), quiet=True)
    sim.setup()
    strategy = sim.method.strategy
    spare = copy.deepcopy(strategy)
    downlinks = {**strategy.configure_round(1, [0, 1]), 2: spare.configure_round(1, [2])[2]}
    replies = {c: Reply(c, sim._fit_client(1, c, downlinks[c].detached_copy())) for c in (0, 1, 2)}
    extra = Reply(0, replies[0].message.detached_copy()) if intruder == "duplicate" else replies[2]
    return strategy, [replies[0], replies[1]], extra


@pytest.mark.parametrize("intruder", ["duplicate", "unsampled"])
@pytest.mark.parametrize("method", METHODS)
def test_a_duplicate_or_unsampled_reply_is_rejected_and_folds_nothing(tmp_path, method, intruder):
    """A reply sent twice, or from a client the round did not sample, is rejected; the round equals the one
    without it, bit for bit (so nothing of it was folded)."""
    # Prepare
    strategy, honest, extra = intruder_round(tmp_path, method, intruder)
    clean, dirty = copy.deepcopy(strategy), copy.deepcopy(strategy)
    # Execute
    clean.aggregate(1, honest)
    report = dirty.aggregate(1, [honest[0], extra, honest[1]])
    # Assert
    assert report.accepted == [0, 1] and list(report.rejected) == [extra.client_id]
    assert_same_state(dirty, clean)


# -- the round against an independent reference (tests/reference_aggregation.py) ------------------------------
def accepted_round(tmp_path, method: str, *extra: str) -> tuple[Strategy, Strategy, list[Reply]]:
    """The strategy before and after round 1 of :func:`round_one_uplinks`, and the replies it accepted."""
    sim, replies = round_one_uplinks(tmp_path, method, *extra)
    before = copy.deepcopy(sim.method.strategy)
    report = sim.method.strategy.aggregate(1, replies)
    accepted = [r for r in replies if r.client_id in report.accepted]
    assert len(accepted) == 3
    return before, sim.method.strategy, accepted


def assert_close(actual: Tensor, expected: Tensor, *, atol: float = 1e-6) -> None:
    """Equal to the float64 reference up to float32 rounding."""
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=1e-5, atol=atol)


def sample_weighted_mean(before: Strategy, after: Strategy, accepted: list[Reply]) -> None:
    """FedAvg: every uploaded tensor becomes ``sum n_i u_i / sum n_i``; what nobody uploaded keeps its value."""
    expected = reference.weighted_average([r.message.tensors for r in accepted],
                                          [r.message.num_samples for r in accepted])
    old, new = before.global_adapter(), after.global_adapter()
    assert set(expected) <= set(old)
    for key in old:
        if key in expected:
            assert_close(new[key], expected[key])
        else:
            assert torch.equal(new[key], old[key]), key


def components_over_their_trainers(before: Strategy, after: Strategy, accepted: list[Reply]) -> None:
    """HAFL adaptive: each rank-1 component is the sample-weighted mean over the clients that trained it only."""
    old, new = before.global_adapter(), after.global_adapter()
    trainers = [r.message.control[INDICES].shape[1] for r in accepted]
    assert len(set(trainers)) == len(trainers)  # the profiles make some components trained by a strict subset
    for row, pair in enumerate(before.pairs):
        updates = [ComponentUpdate(r.message.control[INDICES][row].long(), r.message.tensors[pair.a_key],
                                   r.message.tensors[pair.b_key]) for r in accepted]
        weights = [torch.full((u.indices.numel(),), float(r.message.num_samples)) for u, r in zip(updates, accepted)]
        expected_a, expected_b = reference.adaptive_rank1_average(old[pair.a_key].double(), old[pair.b_key].double(),
                                                                  updates, weights)
        assert_close(new[pair.a_key], expected_a)
        assert_close(new[pair.b_key], expected_b)


def seeded_subspace_updates(before: Strategy, after: Strategy, accepted: list[Reply]) -> None:
    """FedKRSO: each layer moves by ``sum_k Bbar_k P_k``, ``P_k`` drawn from the round's seed ``k`` and the layer."""
    seeds = before.seeds_of(1)
    counts = [float(r.message.num_samples) for r in accepted]
    weights = [c / sum(counts) for c in counts]
    assert len(set(seeds)) > 1
    for layer in before.layers:
        uploads = [(r.message.control[krso_wire.SLOTS].tolist(), r.message.tensors[krso_wire.acc_key(layer.name)])
                   for r in accepted]
        union, averaged = reference.average_accumulators(uploads, weights)
        delta = reference.subspace_update(averaged, [seeds[s] for s in union], layer.key, d_in=layer.d_in)
        moved = after.weights[layer.name].double() - before.weights[layer.name].double()
        assert_close(moved.T if layer.transposed else moved, delta, atol=1e-6)


def masked_cluster_mixture(before: Strategy, after: Strategy, accepted: list[Reply]) -> None:
    """FedHFT: each cluster's update grows by the masked, membership-weighted mean of the clients' kept rows."""
    cfg = before.config
    weights = [r.message.num_samples for r in accepted] if cfg.client_weighting == "samples" else None
    memberships = before.memberships[[r.client_id for r in accepted]]
    for pair in before.layout.pairs:
        d_out, _, rank = before.layout.shapes[pair.module]
        dense, masks = [], []
        for r in accepted:
            b_rows = r.message.tensors[pair.b_key]
            rows = decode_rows(r.message.control, pair.module, d_out, b_rows.shape[0])
            b = torch.zeros(d_out, rank, dtype=torch.float64).index_copy_(0, rows, b_rows.double())
            dense.append(before.scaling * b @ r.message.tensors[pair.a_key].double())
            masks.append(torch.zeros(d_out, dtype=torch.bool).index_fill_(0, rows, True))
        expected = reference.masked_mixture_average(dense, masks, memberships, weights=weights, norm=cfg.norm)
        for j, mixture in enumerate(expected):
            grown = after.cumulative[j][pair.module].double() - before.cumulative[j][pair.module].double()
            assert_close(grown, mixture)


def uniform_mean_with_residual(before: Strategy, after: Strategy, accepted: list[Reply]) -> None:
    """FedEx-LoRA: every uploaded tensor becomes the uniform mean of the uploads, and every adapted base weight
    grows by ``(alpha/r)(mean_k B_k A_k - B̄ Ā)``; what nobody uploaded keeps its value."""
    factors = {t.weight: (t.a_key, t.b_key) for t in before.targets}
    scaling = {t.scaling for t in before.targets}.pop()
    means, new_base = reference.fedex_lora_round([r.message.tensors for r in accepted], factors,
                                                 before.base_weights, scaling=scaling)
    old, new = before.global_adapter(), after.global_adapter()
    assert set(means) < set(old) and set(new_base) < set(old)
    for key in old:
        if key in means or key in new_base:
            assert_close(new[key], means[key] if key in means else new_base[key])
        else:
            assert torch.equal(new[key], old[key]), key
    assert any(not torch.equal(new[k], old[k]) for k in new_base)  # the residual is not zero


def stacked_and_merged(before: Strategy, after: Strategy, accepted: list[Reply]) -> None:
    """FLoRA: every adapted base weight grows by ``B_stack A_stack`` of the accepted factors (ranks 1, 2 and 4,
    each client scaled by alpha/r_k under ``peft_per_rank``), the head is FedAvg'd, the global LoRA factors stay 0."""
    counts = [r.message.num_samples for r in accepted]
    ranks = [r.message.tensors[before.modules[0].pair.a_key].shape[0] for r in accepted]
    assert len(set(ranks)) > 1
    old, new = before.global_adapter(), after.global_adapter()
    for m in before.modules:
        factors = [(r.message.tensors[m.pair.a_key], r.message.tensors[m.pair.b_key]) for r in accepted]
        update = reference.flora_stacked_update(factors, counts, [before.alpha / k for k in ranks])
        grown = new[m.weight_name].double() - old[m.weight_name].double()
        assert_close(grown.T if m.transposed else grown, update)
    heads = reference.weighted_average([{k: r.message.tensors[k] for k in before.head} for r in accepted], counts)
    for key, value in heads.items():
        assert_close(new[key], value)
    assert all(not new[k].any() for k in before.lora_keys)


#: three HAFL profiles (n_k = 1, 2, 4 of r = 4) and sample-count weights: components trained by a strict subset.
HAFL_PROFILES = ("hafl.profiles", "[{clients: [0], freeze_ratio: 0.75}, {clients: [1], freeze_ratio: 0.5}, "
                 "{clients: [2, 3], freeze_ratio: 0.0}]", "hafl.weighting", "datasize")
#: FLoRA ranks 1, 2 and 4 of r = 4, each client scaled by alpha / r_k.
FLORA_PROFILES = ("flora.profiles", "[{clients: [0], rank: 1}, {clients: [1], rank: 2}, {clients: [2, 3], rank: 4}]",
                  "flora.scaling", "peft_per_rank")
#: a method's reference check and the overrides it needs; any other method is FedAvg of its uploads.
REFERENCE_ROUNDS = {"hafl": (components_over_their_trainers, HAFL_PROFILES),
                    "flora": (stacked_and_merged, FLORA_PROFILES),
                    "fedkrso": (seeded_subspace_updates, ()),
                    "fedhft": (masked_cluster_mixture, ()),
                    "fedex_lora": (uniform_mean_with_residual, ())}


@pytest.mark.parametrize("method", METHODS)
def test_round_equals_the_reference_aggregation_of_the_accepted_replies(tmp_path, method):
    """A round of real uplinks equals the method's list-form reference over exactly the accepted replies
    (FedAvg of the uploads unless ``REFERENCE_ROUNDS`` names the method's own property)."""
    check, extra = REFERENCE_ROUNDS.get(method, (sample_weighted_mean, ()))
    check(*accepted_round(tmp_path, method, *extra))


# -- uplinks carry what the plan trained, nothing more -----------------------------------------------------------
def trained_entries(plan: LocalPlan, key: str) -> int:
    """Entries of ``plan.trainable[key]`` the optimiser may change (its gradient mask's ones, if masked)."""
    mask = plan.grad_masks.get(key)
    return int(mask.count_nonzero()) if mask is not None else plan.trainable[key].numel()


def one_client_with_its_plan(tmp_path, method: str, *extra: str) -> tuple[Simulation, LocalPlan, Message]:
    """Client 0 trained in round 1: the simulation, the plan its algorithm made, and its uplink."""
    sim = Simulation(config(tmp_path, method, *extra), quiet=True)
    sim.setup()
    client, plans = sim.method.client, []
    prepare = client.prepare
    client.prepare = lambda *args: plans.append(prepare(*args)) or plans[-1]
    uplink = sim._fit_client(1, 0, sim.method.strategy.configure_round(1, [0])[0].detached_copy())
    return sim, plans[0], uplink


def kept_rows_of_the_level(sim: Simulation, plan: LocalPlan, uplink: Message) -> None:
    """FedHFT: each ``lora_B`` upload has ``max(1, round(s * d_out))`` rows, ``s`` the client's level's keep ratio."""
    strategy = sim.method.strategy
    keep = sim.cfg.fedhft.levels.keep_ratio[strategy.levels[0]]
    assert keep < 1
    for pair in strategy.layout.pairs:
        d_out = plan.trainable[pair.b_key].shape[0]
        assert uplink.tensors[pair.b_key].shape[0] == max(1, int(keep * d_out + 0.5)), pair.b_key


#: method-specific checks of what an uplink holds.
UPLINK_CHECKS = {"fedhft": kept_rows_of_the_level}
#: overrides under which a method trains part of a tensor (HAFL: client 0 trains one of four components).
UPLINK_EXTRA = {"hafl": HAFL_PROFILES}


@pytest.mark.parametrize("method", METHODS)
def test_uplink_carries_only_what_the_plan_trained(tmp_path, method):
    """An uploaded tensor named like a model tensor is one the plan trained, with at most its trained entries;
    method-specific selections (FedHFT's kept rows) have exactly their hand-computed size."""
    sim, plan, uplink = one_client_with_its_plan(tmp_path, method, *UPLINK_EXTRA.get(method, ()))
    model_keys = set(adapter_state(plan.model)) | {name for name, _ in plan.model.named_parameters()}
    for key, tensor in uplink.tensors.items():
        if key in plan.trainable:
            assert tensor.numel() <= trained_entries(plan, key), key
        else:
            assert key not in model_keys, f"{key} is uploaded but was not trained"
    if method in UPLINK_CHECKS:
        UPLINK_CHECKS[method](sim, plan, uplink)
