"""The production running sums fed a whole list: the signatures of ``tests/reference_aggregation.py``.

Tests call a reference and its streamed counterpart with the same arguments
(hand-computed values, properties, streamed-vs-reference comparisons); the
streamed form is what the strategies run, one reply at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fs_gmfl.core.fedavg.ops import WeightedSum
from fs_gmfl.core.fedex_lora.ops import ProductSums, ResidualTarget, fold_residual, residual
from fs_gmfl.core.fedkrso.ops import SeedSums
from fs_gmfl.core.hafl.ops import ComponentSums, ComponentUpdate


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """FedAvg through :class:`WeightedSum`: one ``add`` per state, then ``average`` in the states' dtypes."""
    first = states[0] if states else {}
    sums = WeightedSum(list(first))
    for state, weight in zip(states, weights, strict=True):
        sums.add(state, weight)
    return sums.average({k: v.dtype for k, v in first.items()})


def component_sums(a: Tensor, b: Tensor, updates: Sequence[ComponentUpdate],
                   weights: Sequence[Tensor]) -> ComponentSums:
    """A :class:`ComponentSums` of ``a``/``b`` with every update added (weights: one per component)."""
    sums = ComponentSums(a, b)
    for update, weight in zip(updates, weights, strict=True):
        sums.add(update, weight)
    return sums


def adaptive_rank1_average(a: Tensor, b: Tensor, updates: Sequence[ComponentUpdate],
                           weights: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """HAFL's adaptive aggregation through :meth:`ComponentSums.adaptive_average`."""
    return component_sums(a, b, updates, weights).adaptive_average(a, b)


def zero_padding_average(a: Tensor, b: Tensor, updates: Sequence[ComponentUpdate],
                         weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """HAFL's zero padding through :meth:`ComponentSums.zero_padding_average` (the client weight per component)."""
    per_component = [torch.full((u.indices.numel(),), float(w), dtype=torch.float64) for u, w in zip(updates, weights)]
    return component_sums(a, b, updates, per_component).zero_padding_average(a, b)


def average_accumulators(uploads: Sequence[tuple[Sequence[int], Tensor]],
                         weights: Sequence[float]) -> tuple[list[int], Tensor]:
    """FedKRSO's per-seed average through :class:`SeedSums` (as many slots as the largest one used)."""
    first = uploads[0][1]
    sums = SeedSums(1 + max(int(s) for slots, _ in uploads for s in slots), *first.shape[1:])
    for (slots, values), weight in zip(uploads, weights, strict=True):
        sums.add(slots, values, weight)
    return sums.average(first.dtype)


def fedex_lora_round(states: Sequence[Mapping[str, Tensor]], factors: Mapping[str, tuple[str, str]],
                     base: Mapping[str, Tensor], *, scaling: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """FedEx-LoRA through :class:`WeightedSum` (weight 1 each) and :class:`ProductSums`, float64 results."""
    targets = [ResidualTarget(name, a, b, name, False, scaling) for name, (a, b) in factors.items()]
    sums, products = WeightedSum(list(states[0])), ProductSums(targets)
    for state in states:
        sums.add(state, 1.0)
        products.add(state)
    means = sums.average(dict.fromkeys(states[0], torch.float64))
    return means, {t.weight: fold_residual(base[t.weight].to(torch.float64),
                                           residual(products.mean(t), means[t.b_key], means[t.a_key],
                                                    scaling=scaling), transposed=False) for t in targets}
