"""List-form reference aggregations: each takes every reply of a round at once.

Production aggregates as a streaming fold (``fs_gmfl.core.fedavg.ops.WeightedSum``,
``fs_gmfl.core.hafl.ops.ComponentSums``, ``fs_gmfl.core.fedkrso.ops.SeedSums`` and
FedHFT's ``FedHFTStrategy.fold_reply``); these are the independent, plainly written
formulas the running sums are checked against (``tests/test_streaming.py``,
``tests/test_fedhft_strategy.py``). Nothing in ``fs_gmfl`` imports them.

Every function works in float64, never mutates its inputs, and normalises the
weights first (the running sums divide by the total at the end).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fs_gmfl.core.hafl.ops import ComponentUpdate
from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.errors import AggregationError

F64 = torch.float64


# -- FedAvg (FedIT, FFA-LoRA, GMFL, FFT and every head) ---------------------------------------------------------
def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum.

    Raises:
        AggregationError: there are no weights, one is negative or not finite, or they sum to zero.
    """
    if not weights:
        raise AggregationError("no weights to normalise")
    w = torch.tensor([float(x) for x in weights], dtype=F64)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise AggregationError(f"weights must be finite and non-negative, got {list(weights)}")
    total = float(w.sum())
    if total <= 0:
        raise AggregationError("weights sum to zero")
    return [float(x) / total for x in w]


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """FedAvg key by key: ``avg[k] = sum_i w_i * states[i][k] / sum_i w_i``, cast back to the inputs' dtype.

    Raises:
        AggregationError: a length mismatch, degenerate weights, or a key missing from some state.
    """
    if len(states) != len(weights):
        raise AggregationError(f"{len(states)} states but {len(weights)} weights")
    norm = normalised_weights(weights)
    out: dict[str, Tensor] = {}
    for key, first in states[0].items():
        if any(key not in s for s in states):
            raise AggregationError(f"key '{key}' missing from some states")
        acc = torch.zeros_like(first, dtype=F64)
        for w, s in zip(norm, states):
            acc.add_(s[key].to(F64), alpha=w)
        out[key] = acc.to(first.dtype)
    return out


# -- HAFL (spec section 8) --------------------------------------------------------------------------------------
def adaptive_rank1_average(a: Tensor, b: Tensor, updates: Sequence[ComponentUpdate],
                           weights: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """HAFL adaptive aggregation, component by component (spec 8.1).

    For component ``i`` with contributors ``C_i`` (the clients that uploaded
    it) and weights ``w_{k,i}``: ``b_i = sum_{k in C_i} w_{k,i} b_{k,i} / Z_i``
    with ``Z_i = sum_{k in C_i} w_{k,i}`` (likewise ``a_i``), uniform over
    ``C_i`` when ``Z_i = 0``; a component nobody uploaded keeps its value.
    """
    new_a, new_b = a.to(F64).clone(), b.to(F64).clone()
    for i in range(a.shape[0]):
        contributions = [(u, float(torch.as_tensor(w).reshape(-1)[pos]), pos)
                         for u, w in zip(updates, weights)
                         for pos in (u.indices == i).nonzero().flatten().tolist()]
        if not contributions:
            continue
        z = sum(w for _, w, _ in contributions)
        omegas = [w / z if z > 0 else 1.0 / len(contributions) for _, w, _ in contributions]
        new_a[i] = sum(o * u.a_rows[pos].to(F64) for o, (u, _, pos) in zip(omegas, contributions))
        new_b[:, i] = sum(o * u.b_cols[:, pos].to(F64) for o, (u, _, pos) in zip(omegas, contributions))
    return new_a.to(a.dtype), new_b.to(b.dtype)


def zero_padding_average(a: Tensor, b: Tensor, updates: Sequence[ComponentUpdate],
                         weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Zero-padding aggregation (spec 8.2): pad each client to rank r with zeros, then FedAvg the padded factors.

    Client weights are normalised (uniform when they sum to 0); a component a
    subset trained shrinks by that subset's weight, one nobody trained becomes 0.
    """
    if not updates:
        raise AggregationError("zero-padding aggregation needs at least one update")
    total = float(sum(weights))
    norm = [float(w) / total for w in weights] if total > 0 else [1.0 / len(updates)] * len(updates)
    out_a, out_b = torch.zeros(a.shape, dtype=F64), torch.zeros(b.shape, dtype=F64)
    for u, w in zip(updates, norm):
        padded_a, padded_b = torch.zeros_like(out_a), torch.zeros_like(out_b)
        padded_a[u.indices.long()] = u.a_rows.to(F64)
        padded_b[:, u.indices.long()] = u.b_cols.to(F64)
        out_a += w * padded_a
        out_b += w * padded_b
    return out_a.to(a.dtype), out_b.to(b.dtype)


# -- FedKRSO (spec section 4 step 5) ----------------------------------------------------------------------------
def average_accumulators(uploads: Sequence[tuple[Sequence[int], Tensor]],
                         weights: Sequence[float]) -> tuple[list[int], Tensor]:
    """Per-seed average ``Bbar_k = sum_n p_n Acc_{n,k}`` of one layer; a client that skipped seed ``k`` adds zero.

    Args:
        uploads: per client, its slots and its accumulators ``[len(slots), d_out, r]``.
        weights: normalised weights ``p_n``, one per upload.

    Returns:
        The sorted union of slots and ``Bbar`` (``[len(union), d_out, r]``) in the uploads' dtype.
    """
    if not uploads or len(uploads) != len(weights):
        raise AggregationError(f"{len(uploads)} uploads but {len(weights)} weights")
    union = sorted({int(s) for slots, _ in uploads for s in slots})
    first = uploads[0][1]
    averaged = []
    for slot in union:
        parts = [w * values[list(slots).index(slot)].to(F64) for (slots, values), w in zip(uploads, weights)
                 if slot in slots]
        averaged.append(sum(parts))
    return union, torch.stack(averaged).to(first.dtype)


def seeded_projection(seed: int, layer_key: str, *, rank: int, d_in: int) -> Tensor:
    """``P`` of round seed ``seed`` and layer ``layer_key``, written from spec §4 and §9.2 (float64).

    ``rank x d_in`` entries ``N(0, 1/rank)`` from a CPU generator seeded with
    ``derive_seed("fedkrso-projection", seed, layer_key)``, drawn in float32.
    """
    gen = torch.Generator().manual_seed(derive_seed("fedkrso-projection", int(seed), layer_key))
    return torch.randn(rank, d_in, generator=gen, dtype=torch.float32).to(F64) / rank ** 0.5


def subspace_update(averaged: Tensor, seeds: Sequence[int], layer_key: str, *, d_in: int) -> Tensor:
    """A layer's global change ``sum_k Bbar_k P_k`` (``d_out x d_in``, float64) for the averaged accumulators."""
    rank = averaged.shape[-1]
    return sum(b.to(F64) @ seeded_projection(seed, layer_key, rank=rank, d_in=d_in) for b, seed in zip(averaged, seeds))


# -- FedHFT (spec section 5) ------------------------------------------------------------------------------------
def masked_mixture_average(updates: Sequence[Tensor], masks: Sequence[Tensor], memberships: Tensor, *,
                           weights: Sequence[float] | None = None, norm: str = "count") -> list[Tensor]:
    """Masked, membership-weighted average, one float64 result per cluster.

    ``U_j[a, :] = sum_i w_i pi_ij M_i[a] dW_i[a, :] / n_j[a]`` with
    ``n_j[a] = sum_i w_i M_i[a]`` (``norm="count"``) or ``sum_i w_i pi_ij M_i[a]``
    (``"soft"``); rows nobody sent get ``n = 1`` and stay 0.
    """
    if norm not in ("count", "soft"):
        raise ValueError(f"unknown normalisation {norm!r}")
    w = [1.0] * len(updates) if weights is None else [float(x) for x in weights]
    if not len(updates) == len(masks) == len(w) == memberships.shape[0]:
        raise ValueError("updates, masks, weights and memberships disagree on the number of clients")
    pi = memberships.to(F64)
    rows = [m.to(F64) for m in masks]
    out = []
    for j in range(pi.shape[1]):
        num = sum(w[i] * pi[i, j] * rows[i][:, None] * updates[i].to(F64) for i in range(len(updates)))
        den = sum(w[i] * (pi[i, j] if norm == "soft" else 1.0) * rows[i] for i in range(len(updates)))
        out.append(num / torch.where(den == 0, torch.ones_like(den), den)[:, None])
    return out


def weighted_heads(heads: Sequence[Mapping[str, Tensor]], memberships: Tensor, *,
                   previous: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None,
                   norm: str = "count") -> list[dict[str, Tensor]]:
    """Cluster heads ``C_j = sum_i w_i pi_ij C_i / d_j``, replaced each round.

    ``d_j = sum_i w_i`` (``"count"``) or ``sum_i w_i pi_ij`` (``"soft"``); a
    cluster with ``d_j = 0`` or no membership mass keeps ``previous[j]``.
    """
    w = torch.tensor([1.0] * len(heads) if weights is None else [float(x) for x in weights], dtype=F64)
    pi = memberships.to(F64)
    out = []
    for j in range(pi.shape[1]):
        coef = w * pi[:, j]
        den = float(coef.sum() if norm == "soft" else w.sum())
        if den <= 0 or float(coef.sum()) <= 0:
            out.append({k: v.clone() for k, v in previous[j].items()})
            continue
        out.append({key: (sum(float(c) * h[key].to(F64) for c, h in zip(coef, heads)) / den).to(previous[j][key].dtype)
                    for key in previous[j]})
    return out


# -- FedEx-LoRA (GMFL spec section 7.2) -------------------------------------------------------------------------
def fedex_lora_round(states: Sequence[Mapping[str, Tensor]], factors: Mapping[str, tuple[str, str]],
                     base: Mapping[str, Tensor], *, scaling: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """FedEx-LoRA: the uniform mean of every uploaded tensor, and each base weight plus its residual.

    ``factors`` maps a base weight's name to its module's ``(a_key, b_key)``
    (weights stored ``d_out x d_in``); the new base weight is
    ``W + scaling * (mean_k B_k A_k - mean_k B_k mean_k A_k)``, all in float64.
    Returns ``(means, new base weights)`` in float64.
    """
    if not states:
        raise AggregationError("FedEx-LoRA needs at least one state")
    n = len(states)
    means = {key: sum(s[key].to(F64) for s in states) / n for key in states[0]}
    new_base = {}
    for name, (a_key, b_key) in factors.items():
        product = sum(s[b_key].to(F64) @ s[a_key].to(F64) for s in states) / n
        new_base[name] = base[name].to(F64) + scaling * (product - means[b_key] @ means[a_key])
    return means, new_base


# -- FLoRA (GMFL spec section 7.5) ------------------------------------------------------------------------------
def flora_stacked_update(factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float],
                         scalings: Sequence[float]) -> Tensor:
    """FLoRA's merged update of one module, ``B_stack @ A_stack`` (float64), formed literally by stacking.

    ``A_stack`` stacks ``p_k s_k A_k`` along the rank dimension (rows) and ``B_stack`` the ``B_k`` (columns),
    ``factors[k] = (A_k, B_k)`` of any rank, ``p_k`` the normalised ``weights``, ``s_k`` the client's LoRA scaling.
    """
    shares = normalised_weights(weights)
    a_stack = torch.cat([p * s * a.to(F64) for (a, _), p, s in zip(factors, shares, scalings, strict=True)], dim=0)
    b_stack = torch.cat([b.to(F64) for _, b in factors], dim=1)
    return b_stack @ a_stack
