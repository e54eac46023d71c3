"""HAFL pure functions: importance (against peft's AdaLoRA RankAllocator), selection, profiles, norms, aggregation."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora.layer import RankAllocator
from torch import nn

from fs_gmfl.core.adapter import LoraPair
from fs_gmfl.core.hafl import (ComponentUpdate, ImportanceTracker, assign_profiles, component_scores, element_score,
                               largest_remainder, product_norm, rank1_norms, sensitivity, smooth_importance,
                               take_components, top_components, truncated_factors, update_importance)
from fs_gmfl.core.hafl.ops import ComponentSums
from fs_gmfl.errors import AggregationError
from tests import reference_aggregation as reference
from tests import streamed_aggregation as streamed

F64 = torch.float64


# -- importance ----------------------------------------------------------------------------------
def test_importance_formulas_hand_computed():
    """Eqs. 4-7 on one element: theta 2 -> 3 at lr 0.5 gives I = |3 * 1 / 0.5| = 6, then the EMAs."""
    # Execute
    ipt = sensitivity(torch.tensor([3.0]), torch.tensor([2.0]), lr=0.5)
    ipt_bar, unc_bar = smooth_importance(ipt, torch.tensor([1.0]), torch.tensor([4.0]), beta1=0.5, beta2=0.75)
    # Assert
    assert ipt.item() == 6.0
    assert ipt_bar.item() == 0.5 * 1 + 0.5 * 6  # 3.5
    assert unc_bar.item() == 0.75 * 4 + 0.25 * abs(6 - 3.5)  # 3.625, uses the updated ipt_bar
    assert element_score(ipt_bar, unc_bar).item() == 3.5 * 3.625


def test_component_scores_sum_and_mean():
    """Eq. 8: S_i = sum_j s(B[j,i]) + sum_j s(A[i,j]) ('sum') or the two means ('mean')."""
    score_a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])  # r=2 x d_in=3
    score_b = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # d_out=2 x r=2
    assert component_scores(score_a, score_b, reduce="sum").tolist() == [4 + 6, 4 + 6]
    assert component_scores(score_a, score_b, reduce="mean").tolist() == [2 + 2, 2 + 2]
    score_b[0, 1] = 2.0
    assert component_scores(score_a, score_b, reduce="sum").tolist() == [10.0, 12.0]


def _adalora_model() -> nn.Module:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 5)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    return get_peft_model(Tiny(), AdaLoraConfig(target_modules=["lin"], init_r=4, target_r=2, total_step=10,
                                                beta1=0.85, beta2=0.85))


def test_tracker_matches_peft_rank_allocator():
    """Fed grad := -(theta_t - theta_{t-1}) / lr, peft's RankAllocator and our tracker agree over 3 updates.

    Compared: exp_avg_ipt, exp_avg_unc, the element score, and the 'mean' component score against the
    triplet score peft computes in mask_to_budget (with lora_E's gradient 0, so its score is 0).
    """
    # Prepare
    model = _adalora_model()
    allocator = RankAllocator(model, model.peft_config["default"], "default")
    params = dict(model.named_parameters())
    name_a, name_b, name_e = (f"base_model.model.lin.lora_{x}.default" for x in "ABE")
    pair = LoraPair("lin", "lin.lora_A.weight", "lin.lora_B.weight")
    tracker = ImportanceTracker([pair], 4, lr=0.01, beta1=0.85, beta2=0.85, reduce="mean")
    g = torch.Generator().manual_seed(1)
    old = {pair.a_key: torch.randn(4, 6, generator=g), pair.b_key: torch.randn(5, 4, generator=g)}
    for _ in range(3):
        new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in old.items()}
        with torch.no_grad():
            for name, key in ((name_a, pair.a_key), (name_b, pair.b_key)):
                params[name].copy_(new[key])
                params[name].grad = -(new[key] - old[key]) / 0.01
            params[name_e].grad = torch.zeros_like(params[name_e])
        # Execute
        allocator.update_ipt(model)
        tracker.observe(old, new)
        old = new
    # Assert
    for name, key in ((name_a, pair.a_key), (name_b, pair.b_key)):
        ours = tracker.state[key]
        torch.testing.assert_close(ours["exp_avg_ipt"], allocator.exp_avg_ipt[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours["exp_avg_unc"], allocator.exp_avg_unc[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tracker.element_scores(key), allocator._element_score(name), rtol=1e-5, atol=1e-6)
    triplets = []
    original = allocator._combine_ipt
    allocator._combine_ipt = lambda e, ab: triplets.append(original(e, ab)) or triplets[-1]
    allocator.mask_to_budget(model, budget=2)
    torch.testing.assert_close(tracker.scores()[0], triplets[0], rtol=1e-5, atol=1e-6)


def test_update_importance_is_pure_and_tracker_round_trips():
    """The functional twin leaves its inputs untouched; save -> load -> one more update equals uninterrupted."""
    pair = LoraPair("m", "m.lora_A.weight", "m.lora_B.weight")
    g = torch.Generator().manual_seed(0)
    states = [{pair.a_key: torch.randn(3, 4, generator=g), pair.b_key: torch.randn(5, 3, generator=g)}
              for _ in range(4)]
    first = update_importance({}, states[0], states[1], [pair.a_key, pair.b_key], lr=0.1, beta1=0.8, beta2=0.7)
    snapshot = {k: {n: t.clone() for n, t in v.items()} for k, v in first.items()}
    update_importance(first, states[1], states[2], [pair.a_key, pair.b_key], lr=0.1, beta1=0.8, beta2=0.7)
    assert all(torch.equal(first[k][n], snapshot[k][n]) for k in first for n in first[k])
    a = ImportanceTracker([pair], 3, lr=0.1, beta1=0.8, beta2=0.7)
    a.observe(states[0], states[1])
    b = ImportanceTracker([pair], 3, lr=0.1, beta1=0.8, beta2=0.7)
    b.load_state_dict(a.state_dict())
    a.observe(states[1], states[2])
    b.observe(states[1], states[2])
    assert torch.equal(a.scores(), b.scores()) and a.updates == b.updates == 2


# -- selection -----------------------------------------------------------------------------------
def test_top_components_order_and_ties():
    """Best first; equal scores go to the smaller index; all-zero scores give 0..n-1."""
    assert top_components(torch.tensor([0.1, 0.5, 0.5, 0.9]), 3).tolist() == [3, 1, 2]
    assert top_components(torch.zeros(16), 4).tolist() == [0, 1, 2, 3]
    assert top_components(torch.tensor([1.0, 2.0]), 0).tolist() == []
    with pytest.raises(ValueError):
        top_components(torch.zeros(4), 5)


# -- profiles ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shares,total,expected", [
    ([0.33, 0.33, 0.34], 100, [33, 33, 34]),
    ([0.33, 0.33, 0.34], 10, [3, 3, 4]),
    ([1 / 3, 1 / 3, 1 / 3], 10, [4, 3, 3]),  # remainder ties go to the earlier profile
    ([0.5, 0.5], 7, [4, 3]),
    ([1.0], 5, [5]),
])
def test_largest_remainder(shares, total, expected):
    """Counts are floor(share * total) plus one for the largest remainders, and sum to the total."""
    assert largest_remainder(shares, total) == expected


def test_assign_profiles_is_seeded_and_honours_explicit_ids():
    """Explicit ids keep their profile; the rest is a seeded shuffle cut by shares (same seed, same result)."""
    a = assign_profiles(100, [None, 0.33, 0.33, 0.34], [[0, 1, 2], [], [], []], seed=0)
    assert a[:3] == [0, 0, 0]
    assert [a.count(i) for i in range(4)] == [3, 32, 32, 33]
    assert a == assign_profiles(100, [None, 0.33, 0.33, 0.34], [[0, 1, 2], [], [], []], seed=0)
    assert a != assign_profiles(100, [None, 0.33, 0.33, 0.34], [[0, 1, 2], [], [], []], seed=1)
    assert assign_profiles(4, [], [], seed=0) == [-1, -1, -1, -1]


# -- norms and truncation ------------------------------------------------------------------------
def test_norms_equal_explicit_products():
    """||BA||_F via Gram matrices equals the explicit product's norm; rank-1 norms are ||b_i||*||a_i||."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 7, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    assert product_norm(a, b) == pytest.approx(float(torch.linalg.norm(b @ a)), rel=1e-12)
    expected = torch.stack([torch.linalg.norm(torch.outer(b[:, i], a[i])) for i in range(3)])
    torch.testing.assert_close(rank1_norms(a, b), expected)


def test_truncated_factors_are_the_rank_n_model():
    """Zeroing non-selected components gives B'A' = sum of the selected b_i a_i; b_scale multiplies it."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, 6, generator=g, dtype=F64), torch.randn(5, 4, generator=g, dtype=F64)
    sel = torch.tensor([2, 0])
    ta, tb = truncated_factors(a, b, sel, b_scale=2.0)
    small_a, small_b = take_components(a, b, sel)
    torch.testing.assert_close(tb @ ta, 2.0 * small_b @ small_a)
    assert torch.equal(small_a[0], a[2]) and torch.equal(small_b[:, 1], b[:, 0])


# -- aggregation: the list-form reference and the production running sums, on the same inputs -----------
ADAPTIVE = pytest.mark.parametrize("adaptive_rank1_average",
                                   [reference.adaptive_rank1_average, streamed.adaptive_rank1_average],
                                   ids=["reference", "streamed"])
ZERO_PADDING = pytest.mark.parametrize("zero_padding_average",
                                       [reference.zero_padding_average, streamed.zero_padding_average],
                                       ids=["reference", "streamed"])


def three_clients():
    """r=4, d_in=2, d_out=2. Client 0 trains {0, 1}, client 1 trains {1}, client 2 trains {1, 2}; nobody trains 3."""
    a = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    b = -torch.arange(8, dtype=torch.float32).reshape(2, 4)
    ups = [
        ComponentUpdate(torch.tensor([0, 1]), torch.tensor([[10.0, 10.0], [20.0, 20.0]]),
                        torch.tensor([[1.0, 2.0], [1.0, 2.0]])),
        ComponentUpdate(torch.tensor([1]), torch.tensor([[40.0, 40.0]]), torch.tensor([[4.0], [4.0]])),
        ComponentUpdate(torch.tensor([2, 1]), torch.tensor([[30.0, 30.0], [80.0, 80.0]]),
                        torch.tensor([[3.0, 8.0], [3.0, 8.0]])),
    ]
    return a, b, ups


@ADAPTIVE
def test_adaptive_aggregation_hand_computed(adaptive_rank1_average):
    """Weights 1, 2, 1: comp 0 = client 0's; comp 1 = (1*20 + 2*40 + 1*80)/4 = 45; comp 2 = client 2's; comp 3 kept."""
    a, b, ups = three_clients()
    w = [torch.full((2,), 1.0), torch.full((1,), 2.0), torch.full((2,), 1.0)]
    new_a, new_b = adaptive_rank1_average(a, b, ups, w)
    assert new_a.tolist() == [[10.0, 10.0], [45.0, 45.0], [30.0, 30.0], [6.0, 7.0]]
    assert new_b.tolist() == [[1.0, (2 + 8 + 8) / 4, 3.0, -3.0], [1.0, 4.5, 3.0, -7.0]]


@ADAPTIVE
def test_adaptive_aggregation_zero_weights_fall_back_to_uniform(adaptive_rank1_average):
    """A component whose contributors all have weight 0 is their plain mean; a zero-weight client is ignored otherwise."""
    a, b, ups = three_clients()
    w = [torch.tensor([5.0, 0.0]), torch.tensor([0.0]), torch.tensor([0.0, 0.0])]
    new_a, _ = adaptive_rank1_average(a, b, ups, w)
    assert new_a[0].tolist() == [10.0, 10.0]  # only client 0 has weight on comp 0
    assert new_a[1].tolist() == [pytest.approx((20 + 40 + 80) / 3)] * 2  # all zero -> uniform
    assert new_a[2].tolist() == [30.0, 30.0]


@ZERO_PADDING
def test_zero_padding_hand_computed(zero_padding_average):
    """Weights 1, 2, 1 over all clients (1/4, 1/2, 1/4): comp 0 = 10/4; comp 1 = 45; comp 2 = 30/4; comp 3 -> 0."""
    a, b, ups = three_clients()
    new_a, new_b = zero_padding_average(a, b, ups, [1.0, 2.0, 1.0])
    assert new_a.tolist() == [[2.5, 2.5], [45.0, 45.0], [7.5, 7.5], [0.0, 0.0]]
    assert new_b.tolist() == [[0.25, 4.5, 0.75, 0.0], [0.25, 4.5, 0.75, 0.0]]


def random_updates(seed, clients=5, r=8, d_in=6, d_out=4):
    g = torch.Generator().manual_seed(seed)
    ups, weights = [], []
    for _ in range(clients):
        n = int(torch.randint(1, r, (1,), generator=g))
        idx = torch.randperm(r, generator=g)[:n]
        ups.append(ComponentUpdate(idx, torch.randn(n, d_in, generator=g, dtype=F64),
                                   torch.randn(d_out, n, generator=g, dtype=F64)))
        weights.append(torch.rand(n, generator=g, dtype=F64))
    return torch.randn(r, d_in, generator=g, dtype=F64), torch.randn(d_out, r, generator=g, dtype=F64), ups, weights


@pytest.mark.parametrize("seed", range(5))
def test_running_sums_match_the_reference_loops(seed):
    """The production running sums equal the component-by-component reference loops (float64)."""
    a, b, ups, weights = random_updates(seed)
    client_weights = [float(w[0]) for w in weights]
    for got, ref in ((streamed.adaptive_rank1_average(a, b, ups, weights),
                      reference.adaptive_rank1_average(a, b, ups, weights)),
                     (streamed.zero_padding_average(a, b, ups, client_weights),
                      reference.zero_padding_average(a, b, ups, client_weights))):
        torch.testing.assert_close(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1])


def test_running_sums_do_not_mutate_inputs_and_ignore_client_order():
    """Inputs are bit-identical after folding; permuting clients gives the same result."""
    a, b, ups, weights = random_updates(7)
    before = [t.clone() for u in ups for t in (u.indices, u.a_rows, u.b_cols)] + [a.clone(), b.clone()]
    first = streamed.adaptive_rank1_average(a, b, ups, weights)
    streamed.zero_padding_average(a, b, ups, [1.0] * len(ups))
    after = [t for u in ups for t in (u.indices, u.a_rows, u.b_cols)] + [a, b]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    for perm in itertools.islice(itertools.permutations(range(len(ups))), 1, 4):
        got = streamed.adaptive_rank1_average(a, b, [ups[i] for i in perm], [weights[i] for i in perm])
        torch.testing.assert_close(got[0], first[0])
        torch.testing.assert_close(got[1], first[1])


@pytest.mark.parametrize("rule", ["adaptive", "zero_padding"])
@pytest.mark.parametrize("module", [reference, streamed], ids=["reference", "streamed"])
def test_identical_full_updates_aggregate_to_themselves(module, rule):
    """Every client uploads the same full-rank factors: both rules return them."""
    a, b = torch.randn(3, 4, dtype=F64), torch.randn(2, 3, dtype=F64)
    up = ComponentUpdate(torch.tensor([2, 0, 1]), a[[2, 0, 1]] + 1, b[:, [2, 0, 1]] - 1)
    if rule == "adaptive":
        new_a, new_b = module.adaptive_rank1_average(a, b, [up, up], [torch.ones(3), torch.full((3,), 3.0)])
    else:
        new_a, new_b = module.zero_padding_average(a, b, [up, up], [1.0, 3.0])
    torch.testing.assert_close(new_a, a + 1)
    torch.testing.assert_close(new_b, b - 1)


@pytest.mark.parametrize("indices,a_rows,b_cols,weight,match", [
    (torch.tensor([0, 0]), torch.ones(2, 2), torch.ones(2, 2), torch.ones(2), "distinct"),
    (torch.tensor([4]), torch.ones(1, 2), torch.ones(2, 1), torch.ones(1), r"\[0, 4\)"),
    (torch.tensor([0]), torch.ones(2, 2), torch.ones(2, 1), torch.ones(1), "shapes"),
    (torch.tensor([0]), torch.ones(1, 2), torch.ones(2, 1), torch.tensor([-1.0]), "non-negative"),
    (torch.tensor([0]), torch.ones(1, 2), torch.ones(2, 1), torch.ones(2), "one per component"),
])
def test_malformed_updates_raise(indices, a_rows, b_cols, weight, match):
    """Duplicate or out-of-range indices, wrong shapes and bad weights raise AggregationError in the running sums."""
    a, b = torch.zeros(4, 2), torch.zeros(2, 4)
    with pytest.raises(AggregationError, match=match):
        ComponentSums(a, b).add(ComponentUpdate(indices, a_rows, b_cols), weight)
