"""GMFL pure functions: schedule, statistic and selection (spec GMFL.md sections 4-5, 10)."""

from __future__ import annotations


import pytest
import torch

from fs_gmfl.core.gmfl import ops


def test_schedule_matches_spec_table_for_48_tensors():
    """Frozen counts per 20-round block for RoBERTa-base q,v (n=48), c=0.1, beta=0.05 (spec table, section 5)."""
    # Prepare
    expected_frozen = [0, 7, 9, 12, 14, 16, 19, 21, 24, 26]
    expected_ratio = [0.0, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.55]
    # Execute
    rows = ops.schedule(200, period=20, c=0.1, beta=0.05, max_ratio=0.95, n=48)
    # Assert
    assert [r["frozen"] for r in rows] == expected_frozen
    assert [r["ratio"] for r in rows] == pytest.approx(expected_ratio)
    assert [(r["first_round"], r["last_round"]) for r in rows][:2] == [(1, 20), (21, 40)]
    assert ops.frozen_count(ops.freeze_ratio(10, c=0.1, beta=0.05, max_ratio=0.95), 48) == 28  # unused 10th refresh


def test_time_averaged_frozen_fraction_is_0_315():
    """Mean ratio over 200 rounds with the default schedule is 0.315 (spec arithmetic)."""
    rows = ops.schedule(200, period=20, c=0.1, beta=0.05, max_ratio=0.95, n=48)
    mean = sum(r["ratio"] * (r["last_round"] - r["first_round"] + 1) for r in rows) / 200
    assert mean == pytest.approx(0.315)


def test_float_guard_on_ratio_times_n():
    """0.1 + 7*0.05 = 0.45000000000000007: floor(0.45*20) must be 9, and floor(0.3*10)=3 despite 0.30000000000000004."""
    ratio = ops.freeze_ratio(7, c=0.1, beta=0.05, max_ratio=1.0)
    assert ratio != 0.45 and ops.frozen_count(ratio, 20) == 9
    assert ops.frozen_count(0.1 + 0.2, 10) == 3
    assert ops.frozen_count(0.15, 48) == 7


def test_strict_selection_freezes_strictly_below_threshold():
    """u = [5,1,3,2,4], ratio 0.4: tau = sorted(u)[2] = 3, frozen = {u<3} = {b, d}."""
    u = {"a": 5.0, "b": 1.0, "c": 3.0, "d": 2.0, "e": 4.0}
    assert ops.select_frozen(u, 0.4, tie_policy="strict") == {"b", "d"}


def test_strict_ties_at_threshold_stay_trainable():
    """u = [1,2,2,2], ratio 0.5 -> tau = 2 -> only the 1 is frozen (fewer than floor(0.5*4)=2)."""
    u = {"a": 1.0, "b": 2.0, "c": 2.0, "d": 2.0}
    assert ops.select_frozen(u, 0.5, tie_policy="strict") == {"a"}


def test_exact_k_breaks_ties_by_key_order():
    """Same input, exact_k: exactly two frozen, the tie broken toward the earlier key."""
    u = {"a": 1.0, "b": 2.0, "c": 2.0, "d": 2.0}
    assert ops.select_frozen(u, 0.5, tie_policy="exact_k") == {"a", "b"}


def test_all_equal_magnitudes_freeze_nothing_under_strict():
    """Edge case 2: all-equal magnitudes -> nothing strictly below tau."""
    u = {k: 0.7 for k in "abcdef"}
    assert ops.select_frozen(u, 0.5, tie_policy="strict") == set()


def test_ratio_zero_freezes_nothing_and_ratio_one_freezes_all():
    """Edge cases 1 and 3."""
    u = {"a": 3.0, "b": 1.0, "c": 2.0}
    assert ops.select_frozen(u, 0.0) == set()
    assert ops.select_frozen(u, 1.0) == {"a", "b", "c"}


def test_max_ratio_clamps_the_schedule():
    """rho = min(c + k*beta, max_ratio)."""
    assert ops.freeze_ratio(100, c=0.1, beta=0.05, max_ratio=0.95) == 0.95
    assert ops.freeze_ratio(0, c=0.1, beta=0.05, max_ratio=0.95) == 0.0


def test_update_l1_and_relative_normalisation():
    """u = sum |new - old|; relative divides by ||old||_1 (hand computed)."""
    old = {"x": torch.tensor([1.0, -2.0]), "z": torch.zeros(2)}
    new = {"x": torch.tensor([1.5, -3.0]), "z": torch.tensor([0.1, 0.0])}
    assert ops.update_l1(new, old, ["x", "z"]) == pytest.approx({"x": 1.5, "z": 0.1})
    assert ops.update_l1(new, old, ["x", "z"], normalize="relative") == pytest.approx({"x": 0.5, "z": 0.0})


def test_random_selection_extends_the_frozen_set_to_the_target():
    """The random ablation keeps earlier choices and adds up to floor(ratio*n)."""
    keys = [f"k{i}" for i in range(10)]
    g = torch.Generator().manual_seed(0)
    first = ops.select_frozen_random(keys, set(), 0.3, generator=g)
    second = ops.select_frozen_random(keys, first, 0.5, generator=g)
    assert len(first) == 3 and len(second) == 5 and first <= second


@pytest.mark.parametrize("n", [1, 7, 48, 448])
def test_frozen_count_is_floor(n):
    """frozen_count(i / 100, n) = floor(i * n / 100), computed exactly in integers (no float formula)."""
    for i in range(0, 101):
        assert ops.frozen_count(i / 100, n) == (i * n) // 100
