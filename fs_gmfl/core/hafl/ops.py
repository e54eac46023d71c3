"""HAFL pure functions: importance scores, selection, profile assignment, norms and rank-1 aggregation.

Su, Yan, Deng, "Federated LLMs Fine-tuned with Adaptive Importance-Aware
LoRA" (HAFL, arXiv 2411.06581, ICC 2025). The paper's equations were lost in
the available text; the formulas follow the reconstruction in
``../shared/specs/HAFL.md`` (eqs. 4-14 there), which uses the PLATON /
AdaLoRA sensitivity of peft's ``RankAllocator``.

A LoRA module has ``A`` (``r x d_in``) and ``B`` (``d_out x r``); rank-1
component ``i`` is ``b_i a_i`` with ``b_i = B[:, i]`` and ``a_i = A[i, :]``.
Inputs are never mutated; hyper-parameters are keyword-only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fs_gmfl.core.seeding import generator
from fs_gmfl.errors import AggregationError

F64 = torch.float64


# -- importance (spec eqs. 4-8) -----------------------------------------------------------------
def sensitivity(new: Tensor, old: Tensor, *, lr: float) -> Tensor:
    """Eq. (4): ``I = |theta_t * (theta_t - theta_{t-1}) / lr|``.

    The gradient of PLATON / AdaLoRA's ``|theta * grad|`` is replaced by the
    change between two consecutive global models divided by the learning
    rate (``grad ~ -delta / lr``; the sign does not matter).
    """
    return (new * ((new - old) / lr)).abs()


def smooth_importance(ipt: Tensor, exp_avg_ipt: Tensor, exp_avg_unc: Tensor, *, beta1: float,
                      beta2: float) -> tuple[Tensor, Tensor]:
    """Eqs. (5)-(6): EMA sensitivity and EMA uncertainty, as peft's ``RankAllocator.update_ipt``.

    ``ipt_bar = b1 * ipt_bar + (1 - b1) * ipt``;
    ``unc_bar = b2 * unc_bar + (1 - b2) * |ipt - ipt_bar|`` with the *updated* ``ipt_bar``.

    Returns:
        ``(new_exp_avg_ipt, new_exp_avg_unc)``.
    """
    new_ipt = beta1 * exp_avg_ipt + (1 - beta1) * ipt
    new_unc = beta2 * exp_avg_unc + (1 - beta2) * (ipt - new_ipt).abs()
    return new_ipt, new_unc


def element_score(exp_avg_ipt: Tensor, exp_avg_unc: Tensor) -> Tensor:
    """Eq. (7): ``s = ipt_bar * unc_bar`` (peft's ``RankAllocator._element_score``)."""
    return exp_avg_ipt * exp_avg_unc


def component_scores(score_a: Tensor, score_b: Tensor, *, reduce: str = "sum") -> Tensor:
    """Eq. (8): one score per rank-1 component from the element scores of ``A`` and ``B``.

    ``reduce="sum"`` (paper): ``S_i = sum_j s(B[j, i]) + sum_j s(A[i, j])``;
    ``reduce="mean"`` (AdaLoRA's ``mask_to_budget``): the means instead of the sums.
    """
    if reduce == "sum":
        return score_b.sum(dim=0) + score_a.sum(dim=1)
    if reduce == "mean":
        return score_b.mean(dim=0) + score_a.mean(dim=1)
    raise ValueError(f"unknown score reduction {reduce!r}")


def top_components(scores: Tensor, n: int) -> Tensor:
    """Eqs. (9)/(12): indices of the ``n`` largest scores, best first; ties go to the smaller index.

    With all scores equal (round 1) this is ``0, 1, ..., n-1`` (HetLoRA's
    "first r_k" truncation).
    """
    if not 0 <= n <= scores.numel():
        raise ValueError(f"cannot select {n} of {scores.numel()} components")
    order = torch.sort(scores.detach().to(F64), descending=True, stable=True).indices
    return order[:n].clone()


# -- client profiles ------------------------------------------------------------------------------
def largest_remainder(shares: Sequence[float], total: int) -> list[int]:
    """Integer counts summing to ``total`` proportional to ``shares`` (largest-remainder rounding).

    Each count is ``floor(share * total)``; the clients left over go one each
    to the largest fractional remainders, ties to the earlier share.
    """
    if not shares:
        return []
    weight = sum(shares)
    exact = [s / weight * total for s in shares]
    counts = [math.floor(x + 1e-9) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def assign_profiles(num_clients: int, shares: Sequence[float | None], explicit: Sequence[Sequence[int]], *,
                    seed: int) -> list[int]:
    """Profile index of every client (``-1`` when there are no profiles).

    Profiles with explicit ids take those clients; the remaining clients are
    shuffled with a generator seeded by ``seed`` and cut into consecutive
    blocks, one per share-profile, sized by :func:`largest_remainder`.
    """
    profile_of = [-1] * num_clients
    for index, ids in enumerate(explicit):
        for cid in ids:
            profile_of[cid] = index
    shared = [i for i, s in enumerate(shares) if s is not None]
    if not shared:
        return profile_of
    free = [c for c in range(num_clients) if profile_of[c] == -1]
    order = torch.randperm(len(free), generator=generator(seed, "hafl-profiles")).tolist()
    counts = largest_remainder([float(shares[i]) for i in shared], len(free))  # type: ignore[arg-type]
    start = 0
    for index, count in zip(shared, counts):
        for position in order[start:start + count]:
            profile_of[free[position]] = index
        start += count
    return profile_of


# -- payloads -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentUpdate:
    """A client's trained rank-1 components of one module.

    Attributes:
        indices: global component index of each row of ``a_rows`` / column of ``b_cols`` (``n``).
        a_rows: the trained rows of ``A`` (``n x d_in``).
        b_cols: the trained columns of ``B`` (``d_out x n``).
    """

    indices: Tensor
    a_rows: Tensor
    b_cols: Tensor


def take_components(a: Tensor, b: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. (10): rows ``indices`` of ``A`` and columns ``indices`` of ``B``, in that order (new tensors)."""
    idx = indices.to(torch.long)
    return a.index_select(0, idx), b.index_select(1, idx)


def truncated_factors(a: Tensor, b: Tensor, indices: Tensor, *, b_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Full-rank factors holding only components ``indices`` (others zero); kept columns of B times ``b_scale``.

    With ``b_scale = (alpha / r_k) / (alpha / r_max)`` this is the rank-r_k
    client model expressed in the global adapter's shape.
    """
    idx = indices.to(torch.long)
    keep = torch.zeros(a.shape[0], dtype=torch.bool)
    keep[idx] = True
    new_a = torch.where(keep[:, None], a, torch.zeros((), dtype=a.dtype))
    new_b = torch.where(keep[None, :], b * b_scale, torch.zeros((), dtype=b.dtype))
    return new_a, new_b


def scatter_components(a: Tensor, b: Tensor, update: ComponentUpdate) -> tuple[Tensor, Tensor]:
    """Copies of ``A`` and ``B`` with the update's components written at their indices."""
    idx = update.indices.to(torch.long)
    new_a, new_b = a.clone(), b.clone()
    new_a[idx] = update.a_rows.to(a.dtype)
    new_b[:, idx] = update.b_cols.to(b.dtype)
    return new_a, new_b


# -- norms (spec eq. 14) ------------------------------------------------------------------------
def product_norm(a: Tensor, b: Tensor) -> float:
    """``||B A||_F`` without forming ``B A``: ``sqrt(sum((B^T B) * (A A^T)))``."""
    a64, b64 = a.to(F64), b.to(F64)
    squared = float(((b64.T @ b64) * (a64 @ a64.T)).sum())
    return math.sqrt(max(squared, 0.0))


def rank1_norms(a_rows: Tensor, b_cols: Tensor) -> Tensor:
    """``||b_i a_i||_F = ||b_i|| * ||a_i||`` of every component (float64)."""
    return b_cols.to(F64).norm(dim=0) * a_rows.to(F64).norm(dim=1)


# -- aggregation (spec section 8) ---------------------------------------------------------------
def _check_updates(a: Tensor, b: Tensor, updates: Sequence[ComponentUpdate], weights: Sequence[object]) -> None:
    if len(updates) != len(weights):
        raise AggregationError(f"{len(updates)} updates but {len(weights)} weights")
    r = a.shape[0]
    for u in updates:
        n = u.indices.numel()
        if u.a_rows.shape != (n, a.shape[1]) or u.b_cols.shape != (b.shape[0], n):
            raise AggregationError(f"update shapes {tuple(u.a_rows.shape)}/{tuple(u.b_cols.shape)} do not fit "
                                   f"{n} components of A {tuple(a.shape)} and B {tuple(b.shape)}")
        if n and (int(u.indices.min()) < 0 or int(u.indices.max()) >= r or u.indices.unique().numel() != n):
            raise AggregationError(f"component indices {u.indices.tolist()} are not distinct values in [0, {r})")


class ComponentSums:
    """Running sums of one module's uploaded components: HAFL's adaptive and zero-padding aggregation (spec 8).

    :meth:`add` folds one client's components (with their weights) into
    float64 sums and keeps no reference to them; :meth:`adaptive_average`
    and :meth:`zero_padding_average` divide at the end, giving the list-form
    references of ``tests/reference_aggregation.py`` to float64 rounding
    (those normalise the weights first). Memory: two
    float64 copies of ``A`` and ``B`` plus per-component totals; components
    uploaded with weight exactly 0 (the uniform fallback) get a third copy,
    allocated only when one arrives.

    Args:
        a, b: the module's global factors (shapes only).
    """

    def __init__(self, a: Tensor, b: Tensor) -> None:
        self.rank = a.shape[0]
        self.weighted_a = torch.zeros(a.shape, dtype=F64)
        self.weighted_b = torch.zeros(b.shape, dtype=F64)
        self.weight = torch.zeros(self.rank, dtype=F64)
        self.count = torch.zeros(self.rank, dtype=F64)
        self.zero_weight_a: Tensor | None = None
        self.zero_weight_b: Tensor | None = None
        self.clients = 0
        self.client_weight = 0.0
        self._like = (a, b)

    def add(self, update: ComponentUpdate, weights: Tensor) -> None:
        """Fold one client's components, one weight each (zero padding: the client's weight repeated)."""
        w64 = torch.as_tensor(weights, dtype=F64).reshape(-1)
        _check_updates(*self._like, [update], [w64])
        if w64.numel() != update.indices.numel() or not bool(torch.isfinite(w64).all()) or bool((w64 < 0).any()):
            raise AggregationError(f"weights {w64.tolist()} must be finite, non-negative, one per component")
        idx = update.indices.to(torch.long)
        a_rows, b_cols = update.a_rows.to(F64), update.b_cols.to(F64)
        self.weight.index_add_(0, idx, w64)
        self.count.index_add_(0, idx, torch.ones_like(w64))
        self.weighted_a.index_add_(0, idx, a_rows * w64[:, None])
        self.weighted_b.index_add_(1, idx, b_cols * w64[None, :])
        self._add_zero_weight(idx, a_rows, b_cols, w64 == 0)
        self.clients += 1
        self.client_weight += float(w64[0]) if w64.numel() else 0.0

    def _add_zero_weight(self, idx: Tensor, a_rows: Tensor, b_cols: Tensor, zero: Tensor) -> None:
        """Plain sums of the components uploaded with weight 0 (their average is the uniform fallback)."""
        if not bool(zero.any()):
            return
        if self.zero_weight_a is None or self.zero_weight_b is None:
            self.zero_weight_a = torch.zeros_like(self.weighted_a)
            self.zero_weight_b = torch.zeros_like(self.weighted_b)
        keep = zero.to(F64)
        self.zero_weight_a.index_add_(0, idx, a_rows * keep[:, None])
        self.zero_weight_b.index_add_(1, idx, b_cols * keep[None, :])

    def adaptive_average(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Adaptive aggregation (spec 8.1) of everything added.

        Component ``i`` becomes ``sum_k w_{k,i} b_{k,i} / Z_i`` over the clients
        that uploaded it (``Z_i`` their total weight; uniform over them when
        ``Z_i = 0``); a component nobody uploaded keeps its value in ``a``, ``b``.
        """
        trained = self.count > 0
        z = self.weight.clamp_min(1e-300)
        value_a, value_b = self.weighted_a / z[:, None], self.weighted_b / z[None, :]
        if self.zero_weight_a is not None and self.zero_weight_b is not None:
            unweighted = (self.weight == 0) & trained
            c = self.count.clamp_min(1.0)
            value_a = torch.where(unweighted[:, None], self.zero_weight_a / c[:, None], value_a)
            value_b = torch.where(unweighted[None, :], self.zero_weight_b / c[None, :], value_b)
        return (torch.where(trained[:, None], value_a.to(a.dtype), a),
                torch.where(trained[None, :], value_b.to(b.dtype), b))

    def zero_padding_average(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Zero-padding aggregation (spec 8.2) of everything added: each client padded with zero components.

        Client weights, normalised (uniform when they sum to 0); a component
        a subset trained shrinks by that subset's weight, one nobody trained becomes 0.
        """
        if not self.clients:
            raise AggregationError("zero-padding aggregation needs at least one update")
        if self.client_weight > 0:
            total = self.client_weight
            return (self.weighted_a / total).to(a.dtype), (self.weighted_b / total).to(b.dtype)
        zero_a = self.zero_weight_a if self.zero_weight_a is not None else torch.zeros_like(self.weighted_a)
        zero_b = self.zero_weight_b if self.zero_weight_b is not None else torch.zeros_like(self.weighted_b)
        return (zero_a / self.clients).to(a.dtype), (zero_b / self.clients).to(b.dtype)
