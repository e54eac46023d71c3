"""Federated averaging of adapter tensors (FedAvg [McMahan et al., 2017]; FedIT [Zhang et al., 2024]).

Pure functions over plain ``dict[str, Tensor]``: inputs are never mutated and
hyper-parameters are keyword-only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fs_gmfl.errors import AggregationError


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum.

    Raises:
        AggregationError: there are no weights, one is negative or not
            finite, or they sum to zero.
    """
    if not weights:
        raise AggregationError("no weights to normalise")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise AggregationError(f"weights must be finite and non-negative, got {list(weights)}")
    total = float(w.sum())
    if total <= 0:
        raise AggregationError("weights sum to zero")
    return [float(x) / total for x in w]


def weighted_average(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    *,
    keys: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Weighted mean of tensors key by key (FedAvg, eq. 1 of McMahan et al.).

    ``avg[k] = sum_i w_i * states[i][k] / sum_i w_i``, accumulated in float64
    and cast back to the inputs' dtype.

    Args:
        states: one mapping per client; each must hold every key of ``keys``.
        weights: one non-negative weight per client (e.g. sample counts).
        keys: the keys to average (default: the keys of ``states[0]``).

    Returns:
        A new mapping ``key -> averaged tensor``.

    Raises:
        AggregationError: no states, a length mismatch, or a missing key.
    """
    if len(states) != len(weights):
        raise AggregationError(f"{len(states)} states but {len(weights)} weights")
    norm = normalised_weights(weights)
    keys = list(states[0].keys()) if keys is None else list(keys)
    out: dict[str, Tensor] = {}
    for key in keys:
        missing = [i for i, s in enumerate(states) if key not in s]
        if missing:
            raise AggregationError(f"key '{key}' missing from states {missing}")
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for w, s in zip(norm, states):
            acc.add_(s[key].to(torch.float64), alpha=w)
        out[key] = acc.to(states[0][key].dtype)
    return out
