"""Streaming aggregation (issue 16 item 4): the running-sum ops equal the list-form references of
``tests/reference_aggregation.py``, and the simulator keeps one uplink alive at a time.

The running sums divide by the total weight at the end, where the reference
functions normalise the weights first; in float64 the two agree to rounding,
and after a cast to float32 an entry is identical or one ulp away.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from fs_gmfl.core.fedavg.ops import WeightedSum
from fs_gmfl.core.fedkrso.ops import SeedSums
from fs_gmfl.core.hafl.ops import ComponentSums, ComponentUpdate
from fs_gmfl.errors import AggregationError
from fs_gmfl.hosts.sim.runner import Simulation
from tests import reference_aggregation as reference
from tests import streamed_aggregation as streamed
from tests.reference_aggregation import (adaptive_rank1_average, average_accumulators, weighted_average,
                                         zero_padding_average)

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def float32_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between ``a`` and ``b`` in float32 units in the last place (same signs assumed)."""
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


weighted_sum_average = streamed.weighted_average


# -- FedAvg ---------------------------------------------------------------------------------------
def test_weighted_sum_hand_computed():
    """Weights 1 and 3 on 2 and 6: (2 + 18) / 4 = 5; the inputs are not mutated."""
    # Prepare
    states = [{"x": torch.tensor([2.0, -1.0])}, {"x": torch.tensor([6.0, 3.0])}]
    # Execute
    out = weighted_sum_average(states, [1, 3])
    # Assert
    assert out["x"].tolist() == [5.0, 2.0]
    assert states[0]["x"].tolist() == [2.0, -1.0] and states[1]["x"].tolist() == [6.0, 3.0]


def test_weighted_sum_matches_weighted_average_in_float64():
    """Random float64 states, integer and fractional weights: equal to float64 rounding."""
    g = gen(0)
    states = [{"a": torch.randn(50, 7, generator=g, dtype=F64), "b": torch.randn(3, generator=g, dtype=F64)}
              for _ in range(9)]
    integer = [float(w) for w in torch.randint(1, 1000, (9,), generator=g)]
    for weights in (integer, torch.rand(9, generator=g).tolist()):
        ref, out = weighted_average(states, weights), weighted_sum_average(states, weights)
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], rtol=1e-14, atol=1e-15)


def test_weighted_sum_in_float32_is_identical_or_one_ulp_away():
    """100 float32 clients of 20,000 entries: at most one ulp apart, and almost every entry identical."""
    g = gen(1)
    states = [{"x": torch.randn(20_000, generator=g)} for _ in range(100)]
    weights = [int(w) for w in torch.randint(1, 5000, (100,), generator=g)]
    ref, out = weighted_average(states, weights)["x"], weighted_sum_average(states, weights)["x"]
    assert float32_ulps(out, ref) <= 1
    assert int((out != ref).sum()) <= 20  # measured: a few per million entries differ (module docstring)


def test_weighted_sum_is_exact_for_one_client_and_for_identical_updates():
    """One client gives its own tensor; identical updates with integer weights average to themselves."""
    x = torch.randn(1000, generator=gen(2))
    assert torch.equal(weighted_sum_average([{"x": x}], [37])["x"], x)
    assert torch.equal(weighted_sum_average([{"x": x}] * 5, [3, 1, 4, 1, 5])["x"], x)


def test_weighted_sum_refuses_bad_input():
    """Negative or non-finite weights, missing keys and empty sums raise :class:`AggregationError`."""
    sums = WeightedSum(["x"])
    with pytest.raises(AggregationError, match="no states"):
        sums.average({"x": torch.float32})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(AggregationError, match="finite and non-negative"):
            sums.add({"x": torch.ones(2)}, bad)
    with pytest.raises(AggregationError, match="missing"):
        sums.add({"y": torch.ones(2)}, 1.0)
    sums.add({"x": torch.ones(2)}, 0.0)
    with pytest.raises(AggregationError, match="sum to zero"):
        sums.average({"x": torch.float32})


# -- HAFL -----------------------------------------------------------------------------------------
def hafl_updates(seed: int, rank: int = 4, d_in: int = 5, d_out: int = 6):
    g = gen(seed)
    a, b = torch.randn(rank, d_in, generator=g, dtype=F64), torch.randn(d_out, rank, generator=g, dtype=F64)
    ups = []
    for n in (2, 4, 1, 3):
        idx = torch.randperm(rank, generator=g)[:n]
        ups.append(ComponentUpdate(idx, torch.randn(n, d_in, generator=g, dtype=F64),
                                   torch.randn(d_out, n, generator=g, dtype=F64)))
    return a, b, ups


component_sums = streamed.component_sums


def test_component_sums_match_adaptive_average():
    """Random weights, then a component whose every weight is 0 (the uniform fallback): equal to rounding."""
    a, b, ups = hafl_updates(3)
    g = gen(4)
    weights = [torch.rand(u.indices.numel(), generator=g, dtype=F64) for u in ups]
    zeroed = [w.clone() for w in weights]
    for u, w in zip(ups, zeroed):
        w[u.indices == int(ups[1].indices[0])] = 0.0  # that component: all contributors weigh 0
    for ws in (weights, zeroed):
        ref = adaptive_rank1_average(a, b, ups, ws)
        out = component_sums(a, b, ups, ws).adaptive_average(a, b)
        for r, o in zip(ref, out):
            torch.testing.assert_close(o, r, rtol=1e-13, atol=1e-14)


def test_component_sums_match_zero_padding_average():
    """Client weights 1, 2, 0, 3, then all zero (uniform over clients): equal to rounding."""
    a, b, ups = hafl_updates(5)
    for client_weights in ([1.0, 2.0, 0.0, 3.0], [0.0] * 4):
        ref = zero_padding_average(a, b, ups, client_weights)
        full = [torch.full((u.indices.numel(),), w, dtype=F64) for u, w in zip(ups, client_weights)]
        out = component_sums(a, b, ups, full).zero_padding_average(a, b)
        for r, o in zip(ref, out):
            torch.testing.assert_close(o, r, rtol=1e-13, atol=1e-14)


def test_component_sums_hand_computed():
    """Component 0 from weights 1 (value 2) and 3 (value 6) -> 5; component 1 untouched keeps its value."""
    a, b = torch.zeros(2, 1), torch.full((1, 2), 7.0)
    sums = ComponentSums(a, b)
    sums.add(ComponentUpdate(torch.tensor([0]), torch.tensor([[2.0]]), torch.tensor([[2.0]])), torch.tensor([1.0]))
    sums.add(ComponentUpdate(torch.tensor([0]), torch.tensor([[6.0]]), torch.tensor([[6.0]])), torch.tensor([3.0]))
    new_a, new_b = sums.adaptive_average(a, b)
    assert new_a.tolist() == [[5.0], [0.0]] and new_b.tolist() == [[5.0, 7.0]]


# -- FedKRSO --------------------------------------------------------------------------------------
def test_seed_sums_match_average_accumulators():
    """Clients using slots {0, 2}, {2}, {1, 2}: same union and averages (to rounding) as the reference."""
    g = gen(6)
    uploads = [([0, 2], torch.randn(2, 3, 2, generator=g, dtype=F64)), ([2], torch.randn(1, 3, 2, generator=g,
                                                                                        dtype=F64)),
               ([1, 2], torch.randn(2, 3, 2, generator=g, dtype=F64))]
    weights = [5.0, 1.0, 2.0]
    union, ref = average_accumulators(uploads, [w / sum(weights) for w in weights])
    sums = SeedSums(4, 3, 2)  # one slot more than used: it stays out of the union
    for (slots, values), w in zip(uploads, weights):
        sums.add(slots, values, w)
    got_union, out = sums.average(F64)
    assert got_union == union == [0, 1, 2]
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-15)


def test_seed_sums_refuse_mismatched_accumulators():
    """An accumulator stack that does not fit its slots raises."""
    with pytest.raises(AggregationError, match="do not fit"):
        SeedSums(2, 3, 2).add([0, 1], torch.zeros(1, 3, 2), 1.0)


# -- FedEx-LoRA -----------------------------------------------------------------------------------
def test_fedex_lora_sums_match_the_reference():
    """Three clients, two modules: the uniform means and W + s (mean B_k A_k - B̄ Ā) of the running sums equal the
    list-form reference to float64 rounding."""
    g = gen(7)
    shapes = {"a1": (2, 5), "b1": (3, 2), "a2": (2, 4), "b2": (4, 2), "head": (2, 3)}
    states = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    factors = {"w1": ("a1", "b1"), "w2": ("a2", "b2")}
    base = {"w1": torch.randn(3, 5, generator=g), "w2": torch.randn(4, 4, generator=g)}
    want = reference.fedex_lora_round(states, factors, base, scaling=2.0)
    got = streamed.fedex_lora_round(states, factors, base, scaling=2.0)
    for expected, actual in zip(want, got):
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-14, atol=1e-14)


# -- the simulator keeps one uplink alive --------------------------------------------------------
def test_simulator_releases_each_reply_before_the_next_client_trains(tiny):
    """Wrap the transport: when a client starts, the previous client's reply (and its tensors) are gone."""
    # Prepare
    sim = Simulation(tiny("federate.sample_client_num", "4", "federate.total_round_num", "1"), quiet=True)
    sim.setup()
    deliver = sim.transport.deliver
    previous: list[weakref.ref] = []
    released: list[bool] = []

    def watched(rnd, client_id, downlink):
        released.append(all(ref() is None for ref in previous))
        reply = deliver(rnd, client_id, downlink)
        previous[:] = [weakref.ref(reply.message)] + [weakref.ref(t) for t in reply.message.tensors.values()]
        return reply

    sim.transport.deliver = watched
    # Execute
    row = sim.run_round(1)
    # Assert
    assert released == [True] * 4
    assert all(ref() is None for ref in previous)
    assert row["replies"] == 4 and row["rejected"] == 0
