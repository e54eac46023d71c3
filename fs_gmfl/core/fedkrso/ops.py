"""FedKRSO's tensor operations (Yang et al., arXiv 2602.03019; spec ``FedKRSO.md`` §4-§7).

Notation: a targeted layer computes ``y = W x`` with ``W`` of logical shape
``d_out x d_in``; a seed ``s`` fixes, per layer, a projection ``P_s`` of shape
``r x d_in`` with i.i.d. ``N(0, 1/r)`` entries (so ``E[P^T P] = I``); a client
trains ``B`` (``d_out x r``) in ``W + B P`` and merges ``B P`` into ``W`` at
the end of each interval.

Functions are pure (inputs never mutated, hyper-parameters keyword-only)
except those whose name ends in ``_``: they update a weight *in place* on
purpose, so that no dense ``d_out x d_in`` temporary is ever created, and
client and server run the very same kernel sequence (bit-identical results
on the same device and dtype).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor

from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.core.targets import TargetLayer
from fs_gmfl.errors import AggregationError


def layer_rank(layer: TargetLayer, rank: int) -> int:
    """Subspace rank of ``layer``: ``min(r, d_in, d_out)`` (spec §9.6)."""
    return max(1, min(rank, layer.d_in, layer.d_out))


def layer_seed(seed: int, layer_key: str) -> int:
    """The 63-bit seed of ``P`` for round seed ``seed`` and canonical layer key ``layer_key``.

    Derived by hashing (not from a stream shared by all layers), so it does
    not depend on layer order or on which layers exist (spec §4, "one seed
    covers all layers").
    """
    return derive_seed("fedkrso-projection", int(seed), layer_key)


def projection(seed: int, layer_key: str, *, rank: int, d_in: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", basis: str = "gaussian") -> Tensor:
    """``P`` (``rank x d_in``) of one seed and layer (spec §4: entries ``N(0, 1/rank)``).

    ``basis`` (``fedkrso.basis``): ``gaussian`` is the paper's draw;
    ``orthogonal`` orthonormalises the same draw's rows (reduced QR, in
    float64) and scales them by ``sqrt(d_in / rank)``, so ``P P^T =
    (d_in/rank) I`` and entries keep variance ``1/rank``; ``identity`` is
    ``I`` (``rank == d_in`` only). Always drawn on a CPU generator in float32,
    then cast and moved, so every party computes the same bits whatever its
    device (CUDA and CPU generators differ; spec §9.2).
    """
    if basis == "identity":
        if rank != d_in:
            raise ValueError(f"an identity projection needs rank == d_in, got rank {rank} and d_in {d_in}")
        return torch.eye(d_in, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(layer_seed(seed, layer_key))
    if basis == "orthogonal":
        q, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=gen, dtype=torch.float64))
        p = q.t().mul_(math.sqrt(d_in / rank)).float()
    else:
        p = torch.randn(rank, d_in, generator=gen, dtype=torch.float32).mul_(rank ** -0.5)
    return p.to(dtype=dtype, device=device)


@torch.no_grad()
def merge_(weight: Tensor, b: Tensor, p: Tensor, *, transposed: bool = False) -> Tensor:
    """``W += B P`` in place with one ``addmm_`` (no dense ``B P`` tensor); returns ``weight``.

    ``transposed`` weights (``d_in x d_out``) get ``W += P^T B^T``.
    """
    if transposed:
        return weight.addmm_(p.t(), b.t())
    return weight.addmm_(b, p)


@torch.no_grad()
def apply_update_(weight: Tensor, averaged: Tensor, seeds: Sequence[int], *, layer: TargetLayer, rank: int,
                  basis: str = "gaussian") -> Tensor:
    """One layer's global update ``W += sum_k Bbar_k P_k``, in place, seed by seed (spec §4 step 6).

    Only one ``P`` exists at a time. Server and clients call this same
    function with the same ``averaged`` tensor and seed order, which is what
    makes a replayed client bit-identical to the server.

    Args:
        weight: the layer's stored weight.
        averaged: ``[len(seeds), d_out, r]`` averaged accumulators.
        seeds: the round seeds of the slots, in slot order.
        layer: the layer (its key, widths and orientation).
        rank: the configured rank (clamped per layer).
        basis: ``fedkrso.basis`` (see :func:`projection`).
    """
    r = layer_rank(layer, rank)
    if averaged.shape != (len(seeds), layer.d_out, r):
        raise ValueError(f"averaged accumulators of '{layer.name}' have shape {tuple(averaged.shape)}, "
                         f"expected {(len(seeds), layer.d_out, r)}")
    for j, seed in enumerate(seeds):
        p = projection(seed, layer.key, rank=r, d_in=layer.d_in, dtype=weight.dtype, device=weight.device,
                       basis=basis)
        merge_(weight, averaged[j].to(weight.device), p, transposed=layer.transposed)
    return weight


class SeedSums:
    """Running per-seed sums of one layer's accumulators: ``Bbar_k = sum_n p_n Acc_{n,k}`` (spec §4 step 5).

    :meth:`add` folds one client's accumulators into ``[num_seeds, d_out, r]``
    float64 sums (weight ``w``, not yet normalised) and keeps no reference to
    them; :meth:`average` divides by the total weight of every client added
    (a client that did not use a seed counts as zero, spec §9.4). Equal to
    the list-form reference of ``tests/reference_aggregation.py`` to float64
    rounding (which normalises the weights first).

    Args:
        num_seeds: ``K``.
        d_out: the layer's output width.
        rank: the layer's subspace rank.
    """

    def __init__(self, num_seeds: int, d_out: int, rank: int) -> None:
        self.sums = torch.zeros((num_seeds, d_out, rank), dtype=torch.float64)
        self.used: set[int] = set()
        self.total = 0.0

    def add(self, slots: Sequence[int], values: Tensor, weight: float) -> None:
        """Fold ``weight * values[j]`` into slot ``slots[j]``'s sum (``values``: ``[len(slots), d_out, r]``)."""
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise AggregationError(f"weights must be finite and non-negative, got {weight}")
        if values.shape[0] != len(slots) or tuple(values.shape[1:]) != tuple(self.sums.shape[1:]):
            raise AggregationError(f"accumulators of shape {tuple(values.shape)} do not fit {len(slots)} slots of "
                                   f"shape {tuple(self.sums.shape[1:])}")
        for j, slot in enumerate(slots):
            self.sums[int(slot)].add_(values[j].to(torch.float64), alpha=w)
            self.used.add(int(slot))
        self.total += w

    def average(self, dtype: torch.dtype) -> tuple[list[int], Tensor]:
        """The sorted union of slots used and ``Bbar`` (``[len(union), d_out, r]``) cast to ``dtype``."""
        if self.total <= 0:
            raise AggregationError("weights sum to zero")
        union = sorted(self.used)
        return union, (self.sums[union] / self.total).to(dtype)


def round_seeds(master_seed: int, rnd: int, *, count: int, bits: int) -> list[int]:
    """The ``count`` distinct seeds of round ``rnd``, drawn from ``[1, 2^bits - 1]`` (spec §9.3)."""
    high = 2 ** bits - 1
    if count > high:
        raise ValueError(f"cannot draw {count} distinct seeds from [1, {high}]")
    rng = random.Random(derive_seed(master_seed, "fedkrso-round-seeds", rnd))
    return rng.sample(range(1, high + 1), count)


def interval_slot_generator(schedule_seed: int) -> torch.Generator:
    """The generator a client draws its interval seeds from (``k_i ~ Uniform{0..K-1}``)."""
    return torch.Generator().manual_seed(int(schedule_seed))


def next_slot(generator: torch.Generator, num_seeds: int) -> int:
    """The slot of the next interval."""
    return int(torch.randint(num_seeds, (1,), generator=generator))


def expected_seeds_used(num_seeds: int, intervals: int) -> float:
    """``E|U| = K (1 - (1 - 1/K)^I)``: distinct seeds among ``I`` uniform draws from ``K`` (spec §6)."""
    return num_seeds * (1.0 - (1.0 - 1.0 / num_seeds) ** intervals)


def intervals_per_round(steps: int, interval: int) -> int:
    """``I = ceil(T / J)``."""
    return math.ceil(steps / interval)


def transform_moment(moment: Tensor, p_old: Tensor, p_new: Tensor) -> Tensor:
    """First moment carried to a new subspace: ``(r / d_in) m P_old P_new^T`` (spec §8, ``transform``).

    Computed as ``m @ (P_old @ P_new^T)`` (an ``r x r`` product), never as a
    ``d_out x d_in`` matrix.
    """
    rank, d_in = p_old.shape
    return (moment @ (p_old @ p_new.t())).mul_(rank / d_in)


def projected_decay_grad(weight: Tensor, b: Tensor, p: Tensor, *, strength: float,
                         transposed: bool = False) -> Tensor:
    """Gradient of ``(wd/2) ||W + B P||^2`` with respect to ``B``: ``wd (W P^T + B P P^T)`` (spec §5, ``projected``).

    ``W P^T`` is computed directly (``d_out x r``); for a transposed weight
    ``(P W)^T``. No dense temporary is formed.
    """
    wp = (p @ weight).t() if transposed else weight @ p.t()
    return (wp + b @ (p @ p.t())).mul_(strength)
