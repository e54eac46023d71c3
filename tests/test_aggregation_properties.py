"""Property-based tests of every aggregator: permutation invariance, fixed points, untouched masked entries.

FedAvg, HAFL and FedKRSO are the production running sums (``tests/streamed_aggregation.py``); FedHFT's masked
mixture is the list-form reference (``tests/reference_aggregation.py``) its streamed strategy is checked against.

Hypothesis draws the number of clients, shapes, weights, masks and a seed; tensors come from a torch generator
seeded by that draw, so each example is cheap and reproducible.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_gmfl.core.fedavg import LoraFedAvg
from fs_gmfl.core.gmfl import GlobalMasking, GMFLConfig
from fs_gmfl.core.hafl.ops import ComponentUpdate
from fs_gmfl.core.message import Message, Reply, samples_tensor
from tests.gmfl_parts import gmfl_over_lora_fedavg
from tests.reference_aggregation import masked_mixture_average, weighted_heads
from tests.streamed_aggregation import (adaptive_rank1_average, average_accumulators, weighted_average,
                                        zero_padding_average)

SETTINGS = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**31 - 1)
weights_of = st.lists(st.floats(0.05, 50.0, allow_nan=False, allow_infinity=False), min_size=1, max_size=6)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def permutation(seed: int, n: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding of a float64 sum taken in another order."""
    return torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# -- FedIT / FFA-LoRA: sample-weighted FedAvg -----------------------------------------------------------------
@SETTINGS
@given(seed=seeds, weights=weights_of, rows=st.integers(1, 5), cols=st.integers(1, 5))
def test_fedavg_is_permutation_invariant_and_convex(seed, weights, rows, cols):
    """FedAvg: any client order gives the same mean, which lies between the clients' min and max entries."""
    gen = torch.Generator().manual_seed(seed)
    states = [{"a": randn(gen, rows, cols), "b": randn(gen, cols)} for _ in weights]
    order = permutation(seed, len(weights))
    avg = weighted_average(states, weights)
    shuffled = weighted_average([states[i] for i in order], [weights[i] for i in order])
    for key in ("a", "b"):
        assert close(avg[key], shuffled[key])
        stack = torch.stack([s[key] for s in states])
        assert bool((avg[key] >= stack.min(0).values - 1e-6).all() and (avg[key] <= stack.max(0).values + 1e-6).all())


@SETTINGS
@given(seed=seeds, weights=weights_of, scale=st.floats(0.01, 100.0))
def test_fedavg_identical_inputs_aggregate_to_themselves_and_weights_are_scale_free(seed, weights, scale):
    """FedAvg of copies of one state is that state, bit for bit; scaling every weight changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    state = {"a": randn(gen, 3, 4)}
    assert torch.equal(weighted_average([state] * len(weights), weights)["a"], state["a"])
    states = [{"a": randn(gen, 3, 4)} for _ in weights]
    assert close(weighted_average(states, weights)["a"], weighted_average(states, [w * scale for w in weights])["a"])


# -- GMFL: FedAvg with whole-tensor masks (strategy level: the masked aggregation lives in LoraFedAvg) ---------
KEYS = [f"layer{i}.lora_{ab}.weight" for i in range(3) for ab in "AB"] + ["classifier.modules_to_save.weight"]


def gmfl_strategy(gen: torch.Generator, frozen: set[str]) -> LoraFedAvg:
    initial = {k: randn(gen, 2, 3) for k in KEYS}
    masking = GlobalMasking(GMFLConfig(use=True), KEYS[:-1])
    masking.frozen = set(frozen)
    return gmfl_over_lora_fedavg(initial, masking)


def uplink(tensors: dict[str, torch.Tensor], samples: int) -> Message:
    return Message(tensors, {"num_samples": samples_tensor(samples)})


@SETTINGS
@given(seed=seeds, frozen_flags=st.lists(st.booleans(), min_size=6, max_size=6),
       samples=st.lists(st.integers(1, 1000), min_size=1, max_size=5))
def test_gmfl_frozen_tensors_untouched_and_trainable_ones_averaged_in_any_order(seed, frozen_flags, samples):
    """GMFL: frozen tensors keep every bit; trainable ones equal FedAvg of the uploads whatever the reply order."""
    gen = torch.Generator().manual_seed(seed)
    frozen = {k for k, f in zip(KEYS, frozen_flags) if f}
    first = gmfl_strategy(gen, frozen)
    second = gmfl_over_lora_fedavg(first.global_adapter(), GlobalMasking(GMFLConfig(use=True), KEYS[:-1]))
    second.masking.frozen = set(frozen)
    before = first.global_adapter()
    trainable = first.trainable_keys()
    uploads = [{k: randn(gen, 2, 3) for k in trainable} for _ in samples]
    replies = [Reply(i, uplink(u, n)) for i, (u, n) in enumerate(zip(uploads, samples))]
    order = permutation(seed, len(replies))
    first.configure_round(1, range(len(replies)))
    second.configure_round(1, range(len(replies)))
    report = first.aggregate(1, replies)
    second.aggregate(1, [replies[i] for i in order])
    after, shuffled = first.global_adapter(), second.global_adapter()
    # oracle independent of fedavg.ops: one tensordot of the sample shares with the stacked uploads
    shares = torch.tensor(samples, dtype=torch.float64) / sum(samples)
    assert report.rejected == {}
    for key in KEYS:
        if key in frozen:
            assert torch.equal(after[key], before[key])
        else:
            expected = torch.tensordot(shares, torch.stack([u[key].double() for u in uploads]), dims=1)
            assert close(after[key], expected.float())
        assert close(after[key], shuffled[key])


# -- HAFL: per-component aggregation ---------------------------------------------------------------------------
def component_updates(gen, *, r: int, d_in: int, d_out: int, subsets: list[list[int]]) -> list[ComponentUpdate]:
    return [ComponentUpdate(torch.tensor(s, dtype=torch.long), randn(gen, len(s), d_in), randn(gen, d_out, len(s)))
            for s in subsets]


subsets_of = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True), min_size=1, max_size=5)


@SETTINGS
@given(seed=seeds, subsets=subsets_of)
def test_hafl_permutation_invariant_and_untrained_components_untouched(seed, subsets):
    """HAFL: adaptive and zero-padding ignore reply order; adaptive leaves untrained components bit-identical."""
    gen = torch.Generator().manual_seed(seed)
    a, b = randn(gen, 4, 5), randn(gen, 6, 4)
    updates = component_updates(gen, r=4, d_in=5, d_out=6, subsets=subsets)
    weights = [torch.rand(len(s), generator=gen, dtype=torch.float64) + 0.1 for s in subsets]
    order = permutation(seed, len(updates))
    new_a, new_b = adaptive_rank1_average(a, b, updates, weights)
    perm_a, perm_b = adaptive_rank1_average(a, b, [updates[i] for i in order], [weights[i] for i in order])
    assert close(new_a, perm_a) and close(new_b, perm_b)
    trained = {i for s in subsets for i in s}
    for i in set(range(4)) - trained:
        assert torch.equal(new_a[i], a[i]) and torch.equal(new_b[:, i], b[:, i])
    client_weights = [float(w.mean()) for w in weights]
    pad_a, pad_b = zero_padding_average(a, b, updates, client_weights)
    perm_a, perm_b = zero_padding_average(a, b, [updates[i] for i in order], [client_weights[i] for i in order])
    assert close(pad_a, perm_a) and close(pad_b, perm_b)


@SETTINGS
@given(seed=seeds, clients=st.integers(1, 5), weights=weights_of)
def test_hafl_identical_full_rank_updates_aggregate_to_themselves(seed, clients, weights):
    """HAFL adaptive and zero-padding: copies of one full-rank update give that update (any weights)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = randn(gen, 4, 5), randn(gen, 6, 4)
    same = component_updates(gen, r=4, d_in=5, d_out=6, subsets=[[0, 1, 2, 3]])[0]
    w = (weights * clients)[:clients]
    new_a, new_b = adaptive_rank1_average(a, b, [same] * clients, [torch.full((4,), x) for x in w])
    assert close(new_a, same.a_rows) and close(new_b, same.b_cols)
    pad_a, pad_b = zero_padding_average(a, b, [same] * clients, w)
    assert close(pad_a, same.a_rows) and close(pad_b, same.b_cols)


# -- FedKRSO: per-seed accumulator averaging -------------------------------------------------------------------
@SETTINGS
@given(seed=seeds, slot_sets=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True), min_size=1,
                                      max_size=5))
def test_fedkrso_accumulators_permutation_invariant_and_unused_seeds_absent(seed, slot_sets):
    """FedKRSO: order-free per-seed averages over exactly the union of used slots; an unused seed gets nothing."""
    gen = torch.Generator().manual_seed(seed)
    uploads = [(sorted(s), randn(gen, len(s), 3, 2)) for s in slot_sets]
    raw = torch.rand(len(uploads), generator=gen, dtype=torch.float64).add(0.1)
    weights = (raw / raw.sum()).tolist()
    order = permutation(seed, len(uploads))
    union, avg = average_accumulators(uploads, weights)
    union2, avg2 = average_accumulators([uploads[i] for i in order], [weights[i] for i in order])
    assert union == union2 == sorted({s for slots in slot_sets for s in slots})
    assert close(avg, avg2)
    for pos, slot in enumerate(union):  # hand sum: clients that skipped the slot contribute zero
        expected = sum(w * vals[slots.index(slot)].double() for (slots, vals), w in zip(uploads, weights)
                       if slot in slots)
        assert close(avg[pos], expected.float())


@SETTINGS
@given(seed=seeds, clients=st.integers(1, 5))
def test_fedkrso_identical_uploads_aggregate_to_themselves(seed, clients):
    """FedKRSO: copies of one upload with weights summing to 1 average to that upload."""
    gen = torch.Generator().manual_seed(seed)
    upload = ([0, 2, 3], randn(gen, 3, 4, 2))
    _, avg = average_accumulators([upload] * clients, [1.0 / clients] * clients)
    assert close(avg, upload[1])


# -- FedHFT: masked, membership-weighted mixture average and cluster heads -------------------------------------
@SETTINGS
@given(seed=seeds, clients=st.integers(1, 5), clusters=st.integers(1, 3), norm=st.sampled_from(["count", "soft"]))
def test_fedhft_mixture_permutation_invariant_and_unsent_rows_stay_zero(seed, clients, clusters, norm):
    """FedHFT: client order does not matter; rows no client sent contribute nothing (stay 0)."""
    gen = torch.Generator().manual_seed(seed)
    updates = [randn(gen, 6, 3) for _ in range(clients)]
    masks = [torch.rand(6, generator=gen) < 0.5 for _ in range(clients)]
    pi = torch.rand(clients, clusters, generator=gen, dtype=torch.float64) + 0.05
    pi = pi / pi.sum(1, keepdim=True)
    order = permutation(seed, clients)
    out = masked_mixture_average(updates, masks, pi, norm=norm)
    perm = masked_mixture_average([updates[i] for i in order], [masks[i] for i in order], pi[order], norm=norm)
    unsent = ~torch.stack(masks).any(0)
    for j in range(clusters):
        assert close(out[j], perm[j])
        assert torch.equal(out[j][unsent], torch.zeros_like(out[j][unsent]))


@SETTINGS
@given(seed=seeds, clients=st.integers(1, 5))
def test_fedhft_identical_full_updates_aggregate_to_themselves(seed, clients):
    """FedHFT, one cluster, every row sent: copies of one update average to it (both normalisations)."""
    gen = torch.Generator().manual_seed(seed)
    update = randn(gen, 6, 3)
    masks = [torch.ones(6, dtype=torch.bool)] * clients
    pi = torch.ones(clients, 1, dtype=torch.float64)
    for norm in ("count", "soft"):
        assert close(masked_mixture_average([update] * clients, masks, pi, norm=norm)[0].float(), update)


@SETTINGS
@given(seed=seeds, clients=st.integers(1, 4))
def test_fedhft_cluster_without_membership_mass_keeps_its_head(seed, clients):
    """FedHFT heads: a cluster no participant belongs to keeps its previous head bit for bit; order is free."""
    gen = torch.Generator().manual_seed(seed)
    heads = [{"w": randn(gen, 2, 3)} for _ in range(clients)]
    previous = [{"w": randn(gen, 2, 3)} for _ in range(2)]
    pi = torch.zeros(clients, 2, dtype=torch.float64)
    pi[:, 0] = 1.0
    order = permutation(seed, clients)
    out = weighted_heads(heads, pi, previous=previous)
    perm = weighted_heads([heads[i] for i in order], pi[order], previous=previous)
    assert torch.equal(out[1]["w"], previous[1]["w"])
    assert close(out[0]["w"], perm[0]["w"])
    assert close(out[0]["w"], weighted_average(heads, [1.0] * clients)["w"])
