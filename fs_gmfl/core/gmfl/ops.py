"""GMFL pure functions: update statistic, freeze schedule and mask selection.

Huang et al., "GMFL: Efficient Global Masking for Federated LLM
Fine-tuning" (ACL 2026). Reference behaviour follows the authors' code
(``fed/GMFL.py``): ``u_l = ||theta_new[l] - theta_old[l]||_1``; every
``period`` rounds the freeze ratio is ``rho_k = c + k * beta``; with the
sorted magnitudes ``s``, ``tau = s[floor(rho_k * n)]`` and tensors with
``u_l < tau`` are frozen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

#: guard against ``0.1 + 7 * 0.05 = 0.45000000000000007``-style float error in ``floor(rho * n)``.
RATIO_EPS = 1e-9


def update_l1(
    new: Mapping[str, Tensor],
    old: Mapping[str, Tensor],
    keys: Sequence[str],
    *,
    normalize: str = "none",
) -> dict[str, float]:
    """L1 norm of each tensor's global update, ``u_l = sum |new_l - old_l|``.

    Args:
        new, old: global tensors after and before the aggregation step.
        keys: the tensors to measure (the mask candidates).
        normalize: ``"none"`` (reference) or ``"relative"``, which divides by
            ``||old_l||_1`` (0 if the old tensor is all zeros).
    """
    out: dict[str, float] = {}
    for key in keys:
        diff = float((new[key].to(torch.float64) - old[key].to(torch.float64)).abs().sum())
        if normalize == "relative":
            base = float(old[key].to(torch.float64).abs().sum())
            diff = diff / base if base > 0 else 0.0
        out[key] = diff
    return out


def unit_update_l1(
    new: Mapping[str, Tensor | Sequence[Tensor]],
    old: Mapping[str, Tensor | Sequence[Tensor]],
    units: Sequence[str],
    *,
    normalize: str = "none",
) -> dict[str, float]:
    """GMFL's statistic per mask unit: ``u = sum over the unit's tensors of sum |new - old|``.

    A unit given as one tensor is measured exactly as :func:`update_l1` measures
    a tensor (FedIT's and FFA-LoRA's units), so the wrapper reproduces the
    per-tensor statistic bit for bit. ``normalize="relative"`` divides by the
    unit's ``sum |old|`` (0 if the old unit is all zeros).
    """
    out: dict[str, float] = {}
    for unit in units:
        if isinstance(new[unit], Tensor):
            out.update(update_l1(new, old, [unit], normalize=normalize))
            continue
        parts = list(zip(new[unit], old[unit]))
        diff = sum(float((n.to(torch.float64) - o.to(torch.float64)).abs().sum()) for n, o in parts)
        if normalize == "relative":
            base = sum(float(o.to(torch.float64).abs().sum()) for _, o in parts)
            diff = diff / base if base > 0 else 0.0
        out[unit] = diff
    return out


def freeze_ratio(refresh_index: int, *, c: float, beta: float, max_ratio: float) -> float:
    """Freeze ratio after refresh ``k`` (1-based): ``min(c + k * beta, max_ratio)``; 0 before the first."""
    if refresh_index <= 0:
        return 0.0
    return min(c + refresh_index * beta, max_ratio)


def frozen_count(ratio: float, n: int) -> int:
    """``floor(ratio * n)`` with the float guard, clipped to ``[0, n]``."""
    return max(0, min(n, math.floor(ratio * n + RATIO_EPS)))


def select_frozen(magnitudes: Mapping[str, float], ratio: float, *, tie_policy: str = "strict") -> set[str]:
    """Tensors to freeze for the given ratio (GMFL mask selection, spec section 5).

    Args:
        magnitudes: update statistic per tensor, in the canonical key order.
        ratio: the freeze ratio.
        tie_policy: ``"strict"`` freezes ``u < s[floor(ratio*n)]`` (ties at the
            threshold stay trainable, so possibly fewer than ``floor(ratio*n)``
            are frozen); ``"exact_k"`` freezes exactly ``floor(ratio*n)``, the
            smallest first, ties broken by key order.

    Returns:
        The set of keys to freeze. ``ratio * n >= n`` freezes everything.
    """
    keys = list(magnitudes)
    n = len(keys)
    k = frozen_count(ratio, n)
    if k == 0:
        return set()
    if k >= n:
        return set(keys)
    if tie_policy == "exact_k":
        order = sorted(range(n), key=lambda i: (magnitudes[keys[i]], i))
        return {keys[i] for i in order[:k]}
    if tie_policy != "strict":
        raise ValueError(f"unknown tie policy {tie_policy!r}")
    tau = sorted(magnitudes.values())[k]
    return {key for key in keys if magnitudes[key] < tau}


def select_frozen_random(
    keys: Sequence[str], already_frozen: set[str], ratio: float, *, generator: torch.Generator
) -> set[str]:
    """Random-mask ablation: extend ``already_frozen`` with random tensors up to ``floor(ratio*n)``."""
    target = frozen_count(ratio, len(keys))
    candidates = [k for k in keys if k not in already_frozen]
    extra = max(0, target - len(already_frozen))
    order = torch.randperm(len(candidates), generator=generator).tolist()
    return set(already_frozen) | {candidates[i] for i in order[:extra]}


def schedule(rounds: int, *, period: int, c: float, beta: float, max_ratio: float, n: int) -> list[dict[str, float]]:
    """The freeze schedule over ``rounds`` rounds for ``n`` tensors (no ties).

    Returns one row per block of rounds sharing a mask:
    ``{"first_round", "last_round", "ratio", "frozen"}``. Rounds 1..period
    use no mask; the mask computed after round ``k * period`` is used in
    rounds ``k * period + 1 .. (k + 1) * period``.
    """
    rows = []
    start = 1
    while start <= rounds:
        k = (start - 1) // period
        ratio = freeze_ratio(k, c=c, beta=beta, max_ratio=max_ratio)
        last = min(rounds, start + period - 1)
        rows.append({"first_round": start, "last_round": last, "ratio": ratio, "frozen": frozen_count(ratio, n)})
        start = last + 1
    return rows
