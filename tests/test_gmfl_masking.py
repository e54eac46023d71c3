"""GMFL's server-side masking, tested so that a wrong algorithm fails (issue 17, scope 3).

Each test names the breakage it guards against: dropping the monotone union, an off-by-one in the refresh
round, and a wrong freezing criterion (largest instead of smallest update, mean instead of L1 sum). Expected
values are worked out by hand in the docstrings and comments, not by calling the code under test.
"""

from __future__ import annotations

import pytest
import torch

from fs_gmfl.core.gmfl import GlobalMasking, GMFLConfig
from fs_gmfl.core.gmfl.wrapper import gmfl_lora_client
from fs_gmfl.core.message import Reply
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, Strategy, TrainStats
from tests.gmfl_parts import gmfl_over_lora_fedavg

# Four LoRA tensors of unequal sizes (numel 100, 4, 10, 50) and a head of 6 entries.
A1, B1 = "l1.q.lora_A.weight", "l1.q.lora_B.weight"
A2, B2 = "l1.v.lora_A.weight", "l1.v.lora_B.weight"
HEAD = "classifier.modules_to_save.weight"
SHAPES = {A1: (10, 10), B1: (2, 2), A2: (2, 5), B2: (5, 10), HEAD: (2, 3)}
CANDIDATES = [A1, B1, A2, B2]


def masking(*, c: float, beta: float = 0.0, period: int = 1, **extra) -> GlobalMasking:
    return GlobalMasking(GMFLConfig(use=True, c=c, beta=beta, period=period, **extra), CANDIDATES)


def zeros() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in SHAPES.items()}


def shifted(state: dict[str, torch.Tensor], per_entry: dict[str, float]) -> dict[str, torch.Tensor]:
    """``state`` with every entry of tensor k moved by ``per_entry[k]`` (0 for keys not listed)."""
    return {k: v + per_entry.get(k, 0.0) for k, v in state.items()}


# -- (a) monotone union -----------------------------------------------------------------------------------------
def test_a_frozen_tensor_stays_frozen_when_the_next_selection_would_not_pick_it():
    """c = 0.5, period 1. Round 1 L1 updates (A1, B1, A2, B2) = (100, 8, 30, 250): floor(0.5 * 4) = 2,
    tau = sorted[2] = 100, frozen {B1, A2}. Round 2 only B2 changes, so the magnitudes are (0, 0, 0, 50) with the
    frozen ones counted as 0: tau = sorted[2] = 0 and nothing is strictly below it. The selection alone would
    freeze nothing; the union with the earlier mask keeps {B1, A2} frozen and trainable A1 stays trainable."""
    mask = masking(c=0.5)
    s0 = zeros()
    s1 = shifted(s0, {A1: 1.0, B1: 2.0, A2: 3.0, B2: 5.0})  # L1: 100, 8, 30, 250
    assert mask.observe(1, s0, s1)
    assert mask.frozen == {B1, A2}
    s2 = shifted(s1, {B2: 1.0})  # L1: 0, 0, 0, 50
    assert mask.observe(2, s1, s2)
    assert mask.frozen == {B1, A2}
    assert mask.trainable_flags() == [True, False, False, True]


def test_a_random_ablation_keeps_earlier_frozen_tensors():
    """selection: random, c = 0.25, beta = 0.25: refresh 1 freezes floor(0.5 * 4) = 2 tensors, refresh 2
    floor(0.75 * 4) = 3, and the first two stay among them."""
    mask = masking(c=0.25, beta=0.25, selection="random")
    s0 = zeros()
    mask.observe(1, s0, shifted(s0, {A1: 1.0}))
    first = set(mask.frozen)
    mask.observe(2, s0, shifted(s0, {A1: 1.0}))
    assert len(first) == 2 and len(mask.frozen) == 3 and first <= mask.frozen


# -- (b) refresh timing -----------------------------------------------------------------------------------------
def test_b_masks_are_recomputed_exactly_after_rounds_t_2t_3t_from_that_rounds_update():
    """period 3, c = 0.25, beta = 0.25 (ratios 0.5, 0.75 -> 2 then 3 of 4 tensors), last-round L1 statistic.
    Each round's two smallest updates are a different pair, so a refresh one round early (after round 2: B1, B2)
    or late (after round 4: A2, B1) freezes other tensors than the correct one (after round 3: B1, A1)."""
    mask = masking(c=0.25, beta=0.25, period=3)
    # per-entry moves chosen so that each round's two smallest L1 norms are a different pair
    moves = {
        1: {A1: 0.01, B1: 9.0, A2: 0.02, B2: 9.0},   # L1 (1, 36, 0.2, 450): smallest A2, A1
        2: {A1: 9.0, B1: 0.01, A2: 9.0, B2: 0.001},  # L1 (900, 0.04, 90, 0.05): smallest B1, B2
        3: {A1: 0.01, B1: 0.01, A2: 9.0, B2: 9.0},   # L1 (1, 0.04, 90, 450): smallest B1, A1
        4: {A1: 9.0, B1: 9.0, A2: 0.01, B2: 9.0},    # round 4: A2 smallest (0.1)
        5: {A1: 9.0, B1: 9.0, A2: 9.0, B2: 0.001},   # round 5: B2 smallest (0.05)
        6: {A1: 9.0, B1: 9.0, A2: 0.01, B2: 9.0},    # round 6: A2 smallest among the trainable (0.1)
    }
    state = zeros()
    refreshed, frozen_after = [], {}
    for rnd in range(1, 8):
        new = shifted(state, moves.get(rnd, {A1: 1.0}))
        if mask.observe(rnd, state, new):
            refreshed.append(rnd)
        frozen_after[rnd] = set(mask.frozen)
        state = new
    assert refreshed == [3, 6]
    assert frozen_after[1] == frozen_after[2] == set()
    assert frozen_after[3] == frozen_after[4] == frozen_after[5] == {B1, A1}  # round 3's update, ratio 0.5
    # round 6: frozen B1, A1 count as 0, A2 (0.1) is the smallest trainable one; floor(0.75 * 4) = 3
    assert frozen_after[6] == frozen_after[7] == {B1, A1, A2}


def test_b_the_strategy_sends_the_first_mask_in_round_t_plus_1():
    """period 2: clients of rounds 1 and 2 get no mask and train every tensor; round 3's downlink carries the mask
    computed after round 2 (c = 0.5: the two tensors with the smallest round-2 update)."""
    strategy = gmfl_over_lora_fedavg(zeros(), masking(c=0.5, period=2))
    state = zeros()
    for rnd, move in ((1, {A1: 9.0, B1: 9.0, A2: 0.01, B2: 0.01}), (2, {A1: 0.01, B1: 0.01, A2: 9.0, B2: 9.0})):
        assert "mask" not in strategy.configure_round(rnd, [0])[0].control
        assert strategy.trainable_keys() == [A1, B1, A2, B2, HEAD]
        state = shifted(state, move)
        strategy.aggregate(rnd, [upload(gmfl_lora_client("fedit", CANDIDATES), strategy, rnd, state)])
    assert "mask" in strategy.configure_round(3, [0])[0].control
    assert strategy.trainable_keys() == [A2, B2, HEAD]


# -- (c) the freezing criterion, seen in bytes ------------------------------------------------------------------
def upload(client: ClientAlgorithm, strategy: Strategy, rnd: int, values: dict[str, torch.Tensor]):
    """One client's round against ``strategy``: receive, 'train' to ``values``, upload."""
    message = strategy.configure_round(rnd, [0])[0]
    model = torch.nn.Module()
    for i, key in enumerate(SHAPES):
        model.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(SHAPES[key])))
    params = dict(zip(SHAPES, model.parameters()))
    frozen = client._frozen_keys(message, {})
    trainable = {k: p for k, p in params.items() if k not in frozen}
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(values[k])
    plan = LocalPlan(model=model, trainable=trainable)
    return Reply(0, client.finish(plan, TrainStats(num_samples=10, steps=1, mean_loss=0.0), {}))


@pytest.mark.parametrize("stat", ["last_round_l1", "period_sum_l1"])
def test_c_freezing_the_smallest_l1_update_sends_the_hand_computed_bytes(stat):
    """Round-1 update per entry (A1, B1, A2, B2) = (0.01, 0.5, 0.3, 0.1) on (100, 4, 10, 50) entries:

    * L1 sums (the spec's statistic): 1.0, 2.0, 3.0, 5.0 -> c = 0.5 freezes the two smallest, A1 and B1
      (104 entries), and round 2 uploads A2 + B2 + head = 10 + 50 + 6 = 66 floats = 264 bytes + 8;
    * by mean |update| it would freeze A1 and B2 (150 entries, upload 20 floats);
    * by the largest L1 it would freeze B2 and A2 (60 entries, upload 110 floats);
    * by the largest mean it would freeze B1 and A2 (14 entries, upload 156 floats).
    """
    strategy = gmfl_over_lora_fedavg(zeros(), masking(c=0.5, period=1, stat=stat))
    client = gmfl_lora_client("fedit", CANDIDATES)
    moved = shifted(zeros(), {A1: 0.01, B1: 0.5, A2: 0.3, B2: 0.1, HEAD: 1.0})
    first = upload(client, strategy, 1, moved)
    assert first.message.nbytes == (100 + 4 + 10 + 50 + 6) * 4 + 8
    strategy.aggregate(1, [first])
    second = upload(client, strategy, 2, moved)
    assert set(second.message.tensors) == {A2, B2, HEAD}
    assert second.message.nbytes == (10 + 50 + 6) * 4 + 8


# -- (d) the random-selection ablation ----------------------------------------------------------------------------
def run_refreshes(selection: str, seed: int, rounds: int = 6) -> list[set[str]]:
    """Masks after each of ``rounds`` refreshes (period 1, c = 0.1, beta = 0.15: ratios 0.25 .. 1.0, floors
    1, 1, 2, 2, 3, 4 of the 4 tensors) from per-round updates with distinct L1 norms (no ties)."""
    mask = GlobalMasking(GMFLConfig(use=True, c=0.1, beta=0.15, period=1, max_ratio=1.0, selection=selection),
                         CANDIDATES, seed=seed)
    state, masks = zeros(), []
    for rnd in range(1, rounds + 1):
        new = shifted(state, {A1: 0.3 * rnd, B1: 7.0, A2: 0.01, B2: 1.0 + rnd})
        mask.observe(rnd, state, new)
        state = new
        masks.append(set(mask.frozen))
    return masks


def test_d_random_selection_freezes_as_many_tensors_as_the_magnitude_rule_at_every_refresh():
    """Without ties the magnitude rule freezes floor(ratio * 4) = 1, 1, 2, 2, 3, 4 tensors (hand count from the
    ratios 0.25, 0.4, 0.55, 0.7, 0.85, 1.0: 1.0, 1.6, 2.2, 2.8, 3.4, 4.0 rounded down); the ablation must freeze
    the same number, only possibly other tensors."""
    expected = [1, 1, 2, 2, 3, 4]
    assert [len(m) for m in run_refreshes("magnitude", seed=0)] == expected
    for seed in (0, 1, 2, 3):
        assert [len(m) for m in run_refreshes("random", seed=seed)] == expected


def test_d_random_selection_is_reproducible_from_the_seed_and_magnitude_selection_ignores_it():
    """Same seed -> the same masks; the magnitude masks are identical for every seed (the ablation's generator
    is never drawn from), and the first magnitude pick is the smallest update, A2 (L1 0.01 * 10 entries = 0.1)."""
    assert run_refreshes("random", seed=5) == run_refreshes("random", seed=5)
    assert len({tuple(sorted(m[2])) for m in (run_refreshes("random", seed=s) for s in range(12))}) > 1
    magnitude = run_refreshes("magnitude", seed=0)
    assert all(run_refreshes("magnitude", seed=s) == magnitude for s in (1, 7, 123))
    assert magnitude[0] == {A2}
