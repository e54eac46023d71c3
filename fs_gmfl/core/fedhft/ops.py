"""FedHFT pure functions: row masks, cluster mixtures, low-rank factors, memberships.

Ilhan et al., "FedHFT: Efficient Federated Finetuning with Heterogeneous Edge
Clients" (IEEE CogMI 2025, arXiv 2510.14054); reference code
``git-disl/FedHFT`` (``fed.py``). Equation numbers refer to
``shared/specs/FedHFT.md`` (the paper body is not available):

* row energy ``e = diag(B (A Aᵀ) Bᵀ) · s²`` = squared row norms of ``ΔW = s B A`` (§4);
* row mask ``M = TopRows_k(e)`` with ``k = max(1, round(s_level · d_out))`` (§5, §10.10);
* masked, membership-weighted average ``Ū_j = Σ_i ω_i π_ij M_i ⊙ ΔW_i / n`` (§5), folded reply by reply
  in :meth:`fs_gmfl.core.fedhft.strategy.FedHFTStrategy.fold_reply`;
* personalised start ``SVD_r(Σ_j π_ij G_j)`` (§5);
* memberships: Gaussian-mixture posteriors of client features (§4).

Inputs are never mutated; hyper-parameters are keyword-only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from fs_gmfl.core.seeding import generator as seeded_generator

#: guard against float error in ``round(s * d_out)`` (``0.29 * 100 = 28.999999999999996``).
ROUND_EPS = 1e-9


def kept_row_count(keep_ratio: float, d_out: int) -> int:
    """Rows a level keeps: ``max(1, round(keep_ratio * d_out))``, halves rounded up, at most ``d_out``."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    return min(d_out, max(1, math.floor(keep_ratio * d_out + 0.5 + ROUND_EPS)))


def row_energies(a: Tensor, b: Tensor, *, scaling: float = 1.0) -> Tensor:
    """Squared L2 norm of every row of ``ΔW = scaling · B A``, without forming ``ΔW``.

    ``‖ΔW[i, :]‖² = s² · B[i] (A Aᵀ) B[i]ᵀ``: one ``r × r`` Gram matrix and
    ``O(d_out r²)`` work instead of ``O(d_out d_in r)`` (spec §4).

    Args:
        a: ``lora_A``, shape ``r × d_in``.
        b: ``lora_B``, shape ``d_out × r``.
        scaling: the LoRA scaling ``alpha / r``.

    Returns:
        float64 tensor of length ``d_out``.
    """
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    gram = a64 @ a64.T
    return ((b64 @ gram) * b64).sum(dim=1).clamp_min(0.0) * (scaling * scaling)


def top_rows(scores: Tensor, k: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Indices (ascending) of the ``k`` highest scores; exactly ``k`` rows whatever the ties.

    Ties are broken by the lower index, or at random with ``generator``
    (so an all-zero score picks ``k`` random rows).
    """
    n = scores.numel()
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} rows")
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    ranked = torch.sort(scores.detach().flatten()[order], descending=True, stable=True).indices
    return order[ranked[:k]].sort().values


def mixture(matrices: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ_j weights[j] · matrices[j]`` in float64 (clusters with weight 0 are skipped)."""
    if len(matrices) != len(weights) or not matrices:
        raise ValueError("need one weight per matrix and at least one matrix")
    out = torch.zeros(matrices[0].shape, dtype=torch.float64, device=matrices[0].device)
    for weight, matrix in zip(weights, matrices):
        if weight:
            out.add_(matrix.to(torch.float64), alpha=float(weight))
    return out


def low_rank_factors(
    matrix: Tensor,
    rank: int,
    *,
    method: str = "randomized",
    seed: int = 0,
    power_iters: int = 2,
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors ``(B̃, Ã)`` with ``B̃ Ã ≈ matrix``: ``B̃ = U diag(S)``, ``Ã = Vᵀ`` (code convention).

    ``"randomized"`` is the seeded range finder of Halko et al. (what
    ``torch.svd_lowrank(q=rank)`` does, with an explicit generator so the
    result is reproducible); ``"exact"`` truncates ``torch.linalg.svd``.
    Factors are zero-padded to ``rank`` when ``min(d_out, d_in) < rank``.

    Returns:
        ``(B̃, Ã)`` of shapes ``d_out × rank`` and ``rank × d_in``, in ``matrix``'s dtype.
    """
    m = matrix.detach().to(torch.float64)
    q = min(rank, *m.shape)
    if method == "exact":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    elif method == "randomized":
        u, s, vh = _randomized_svd(m, q, seed=seed, power_iters=power_iters)
    else:
        raise ValueError(f"unknown SVD method {method!r}")
    b = torch.zeros(m.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, m.shape[1], dtype=torch.float64)
    b[:, :q] = u[:, :q] * s[:q]
    a[:q] = vh[:q]
    return b.to(matrix.dtype), a.to(matrix.dtype)


def _randomized_svd(m: Tensor, q: int, *, seed: int, power_iters: int) -> tuple[Tensor, Tensor, Tensor]:
    omega = torch.randn(m.shape[1], q, generator=seeded_generator(seed), dtype=torch.float64)
    basis = torch.linalg.qr(m @ omega).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(m @ torch.linalg.qr(m.T @ basis).Q).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return basis @ u_small, s, vh


def assign_levels(num_clients: int, shares: Sequence[float], *, seed: int) -> list[int]:
    """Level index of every client: counts by largest remainder, clients by a seeded permutation.

    The code takes ``int(N * share)`` clients per level and leaves the rest
    without a level (skipped); here every client gets one.
    """
    raw = [s * num_clients for s in shares]
    counts = [math.floor(x + ROUND_EPS) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: num_clients - sum(counts)]:
        counts[i] += 1
    order = torch.randperm(num_clients, generator=seeded_generator(seed, "fedhft-levels")).tolist()
    levels = [0] * num_clients
    start = 0
    for level, count in enumerate(counts):
        for cid in order[start:start + count]:
            levels[cid] = level
        start += count
    return levels


def gmm_memberships(
    features: Tensor,
    num_clusters: int,
    *,
    covariance: str = "full",
    pca_dim: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Posterior cluster memberships of a Gaussian mixture fitted to ``features`` (rows = clients).

    With ``pca_dim``, features are first reduced to
    ``min(pca_dim, n - 1, D)`` principal components (a full-covariance
    mixture on D-dimensional heads with a few dozen points is degenerate).

    Raises:
        ValueError: fewer than ``max(2, num_clusters)`` rows (the caller keeps
            the previous memberships), or sklearn cannot fit the data.
    """
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    n = features.shape[0]
    if num_clusters < 2 or n < max(2, num_clusters):
        raise ValueError(f"cannot fit {num_clusters} clusters to {n} clients")
    x = features.detach().to(torch.float64).reshape(n, -1).numpy()
    state = seed % (2**32)
    if pca_dim:
        x = PCA(n_components=min(pca_dim, n - 1, x.shape[1]), random_state=state).fit_transform(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = GaussianMixture(num_clusters, covariance_type=covariance, random_state=state).fit(x)
        probs = model.predict_proba(x)
    return torch.from_numpy(probs).to(torch.float64)


def align_memberships(new: Tensor, old: Tensor) -> Tensor:
    """Permute the columns of ``new`` to best match ``old`` (same clients): max ``trace(oldᵀ new P)``.

    A refitted mixture numbers its components arbitrarily; without this the
    accumulator of cluster j would receive another group's updates. The
    columns are permuted only if that fits strictly better than sklearn's
    order, so with uniform ``old`` memberships ``new`` is returned unchanged.
    """
    from scipy.optimize import linear_sum_assignment

    overlap = (old.to(torch.float64).T @ new.to(torch.float64)).numpy()
    rows, cols = linear_sum_assignment(-overlap)
    best, kept = float(overlap[rows, cols].sum()), float(overlap.trace())
    if best <= kept + 1e-12 * max(1.0, abs(kept)):
        return new.clone()
    return new[:, torch.as_tensor(cols)].clone()
