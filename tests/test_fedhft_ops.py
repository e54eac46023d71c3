"""FedHFT pure functions (row energies, row masks, SVD factors, levels, memberships) and, by hand, the list-form
masked averaging of ``tests/reference_aggregation.py`` that the streamed strategy is checked against."""

from __future__ import annotations

import pytest
import torch

from fs_gmfl.core.fedhft import (align_memberships, assign_levels, gmm_memberships, kept_row_count,
                                 low_rank_factors, mixture, row_energies, top_rows)
from fs_gmfl.core.fedhft.wire import ROW_BITS, ROW_INDEX, decode_rows, encode_rows
from tests.reference_aggregation import masked_mixture_average, weighted_heads

# Three clients, d_out = d_in = 2, K = 2; each update is rank 1 (rows [x, x]).
UPDATES = [torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.tensor([[3.0, 3.0], [4.0, 4.0]]),
           torch.tensor([[5.0, 5.0], [6.0, 6.0]])]
MASKS = [torch.tensor([True, True]), torch.tensor([True, False]), torch.tensor([False, True])]
PI = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
# count: n = [2, 2] for both clusters.  cluster 0: row0 (1 + 0.5*3)/2, row1 (2 + 0)/2;
#                                        cluster 1: row0 (0 + 0.5*3)/2, row1 (0 + 6)/2.
EXPECTED_COUNT = [torch.tensor([[1.25, 1.25], [1.0, 1.0]]), torch.tensor([[0.75, 0.75], [3.0, 3.0]])]
# soft: cluster 0: n = [1 + 0.5, 1] -> row0 2.5/1.5, row1 2/1; cluster 1: n = [0.5, 1] -> row0 1.5/0.5, row1 6/1.
EXPECTED_SOFT = [torch.tensor([[5 / 3, 5 / 3], [2.0, 2.0]]), torch.tensor([[3.0, 3.0], [6.0, 6.0]])]


def test_row_energies_equal_dense_row_norms():
    """diag(B (A Aᵀ) Bᵀ)·s² equals the squared row norms of s·B·A (max rel. err < 1e-5)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 96, generator=g), torch.randn(64, 8, generator=g)
    dense = 2.0 * (b @ a)
    expected = dense.pow(2).sum(dim=1).to(torch.float64)
    got = row_energies(a, b, scaling=2.0)
    assert float(((got - expected).abs() / expected).max()) < 1e-5


@pytest.mark.parametrize("ratio,d_out,k", [(0.5, 768, 384), (0.25, 768, 192), (1.0, 16, 16), (0.01, 16, 1),
                                           (0.5, 3, 2), (0.29, 100, 29), (0.001, 384, 1)])
def test_kept_row_count(ratio, d_out, k):
    """k = max(1, round(s·d_out)), halves rounded up, never 0."""
    assert kept_row_count(ratio, d_out) == k


def test_top_rows_keeps_exactly_k_despite_ties():
    """All scores tied: exactly k rows (lowest indices; seeded-random with a generator, reproducibly)."""
    scores = torch.zeros(10)
    assert top_rows(scores, 3).tolist() == [0, 1, 2]
    r1 = top_rows(scores, 3, generator=torch.Generator().manual_seed(5))
    r2 = top_rows(scores, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(r1, r2) and r1.numel() == 3 and len(set(r1.tolist())) == 3
    assert top_rows(torch.tensor([0.1, 3.0, 0.2, 3.0, 2.0]), 2).tolist() == [1, 3]


@pytest.mark.parametrize("norm,expected", [("count", EXPECTED_COUNT), ("soft", EXPECTED_SOFT)])
def test_masked_mixture_average_hand_computed(norm, expected):
    """The masked, membership-weighted average equals the hand-computed reference for both normalisations."""
    out = masked_mixture_average(UPDATES, MASKS, PI, norm=norm)
    for got, want in zip(out, expected):
        assert torch.allclose(got, want.to(torch.float64))


def test_masked_average_rows_nobody_sent_stay_zero_and_weights_scale():
    """A row no client sent is 0 (denominator 1); sample weights 1 and 3 give (1*1 + 3*3)/4 on row 0 (K=1)."""
    updates = [torch.tensor([[1.0], [7.0]]), torch.tensor([[3.0], [9.0]])]
    masks = [torch.tensor([True, False]), torch.tensor([True, False])]
    out = masked_mixture_average(updates, masks, torch.ones(2, 1), weights=[1, 3])
    assert torch.allclose(out[0], torch.tensor([[2.5], [0.0]], dtype=torch.float64))


def test_pure_functions_do_not_mutate_inputs():
    """Inputs are bit-identical after every pure function."""
    updates, masks, pi = [u.clone() for u in UPDATES], [m.clone() for m in MASKS], PI.clone()
    heads = [{"h": torch.randn(2, 3)} for _ in range(3)]
    saved_heads = [{"h": h["h"].clone()} for h in heads]
    a, b = torch.randn(2, 5), torch.randn(4, 2)
    a0, b0 = a.clone(), b.clone()
    masked_mixture_average(updates, masks, pi, norm="soft")
    weighted_heads(heads, pi, previous=[{"h": torch.zeros(2, 3)}] * 2)
    row_energies(a, b)
    low_rank_factors(b @ a, 1)
    mixture(updates, [0.5, 0.25, 0.25])
    assert all(torch.equal(x, y) for x, y in zip(updates, UPDATES)) and torch.equal(pi, PI)
    assert all(torch.equal(x, y) for x, y in zip(masks, MASKS))
    assert all(torch.equal(h["h"], s["h"]) for h, s in zip(heads, saved_heads))
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_weighted_heads_count_soft_and_empty_cluster():
    """count divides by the participants, soft by the summed membership; a cluster with no mass keeps its head."""
    heads = [{"h": torch.tensor([2.0])}, {"h": torch.tensor([6.0])}]
    pi = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    previous = [{"h": torch.tensor([0.0])}, {"h": torch.tensor([9.0])}]
    count = weighted_heads(heads, pi, norm="count", previous=previous)
    soft = weighted_heads(heads, pi, norm="soft", previous=previous)
    assert torch.allclose(count[0]["h"], torch.tensor([(2 + 3) / 2]))
    assert torch.allclose(soft[0]["h"], torch.tensor([(2 + 3) / 1.5]))
    assert torch.equal(count[1]["h"], torch.tensor([9.0])) and torch.equal(soft[1]["h"], torch.tensor([9.0]))


def test_low_rank_factors_rank_and_accuracy():
    """SVD_r has rank <= r, B̃ = U·S and Ã = Vᵀ (orthonormal rows); randomized = exact on a rank-r matrix."""
    g = torch.Generator().manual_seed(1)
    low = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 10, generator=g, dtype=torch.float64)
    full = low + 0.1 * torch.randn(12, 10, generator=g, dtype=torch.float64)
    b, a = low_rank_factors(full, 3, method="exact")
    assert b.shape == (12, 3) and a.shape == (3, 10)
    assert int(torch.linalg.matrix_rank(b @ a)) <= 3
    assert torch.allclose(a @ a.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    s = torch.linalg.svdvals(full)
    assert torch.isclose(torch.linalg.norm(full - b @ a), s[3:].norm())  # Eckart-Young
    rb, ra = low_rank_factors(low, 3, method="randomized", seed=7)
    assert torch.allclose(rb @ ra, low, atol=1e-9)
    again = low_rank_factors(low, 3, method="randomized", seed=7)
    assert torch.equal(again[0], rb) and torch.equal(again[1], ra)


def test_low_rank_factors_pad_when_rank_exceeds_matrix():
    """min(d_out, d_in) < r: the extra factor rows/columns are zero and the product is exact."""
    m = torch.randn(2, 5, dtype=torch.float64)
    b, a = low_rank_factors(m, 4, method="randomized", seed=0)
    assert b.shape == (2, 4) and a.shape == (4, 5)
    assert torch.allclose(b @ a, m, atol=1e-10) and not b[:, 2:].any() and not a[2:].any()


def test_assign_levels_largest_remainder_and_seeded():
    """20 clients at thirds: 7, 7, 6 clients; same seed same assignment; every client has a level."""
    levels = assign_levels(20, [1 / 3, 1 / 3, 1 / 3], seed=3)
    assert [levels.count(i) for i in range(3)] == [7, 7, 6]
    assert levels == assign_levels(20, [1 / 3, 1 / 3, 1 / 3], seed=3)
    assert levels != assign_levels(20, [1 / 3, 1 / 3, 1 / 3], seed=4)
    assert assign_levels(5, [1.0], seed=0) == [0] * 5


def blobs(n_per: int = 10, dim: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    centre = torch.zeros(dim)
    centre[0] = 10.0
    return torch.cat([torch.randn(n_per, dim, generator=g) + centre, torch.randn(n_per, dim, generator=g) - centre])


@pytest.mark.parametrize("pca_dim,covariance", [(None, "diag"), (4, "full")])
def test_gmm_memberships_separate_two_groups(pca_dim, covariance):
    """Two far-apart groups: memberships are (near) one-hot and split the clients by group."""
    probs = gmm_memberships(blobs(), 2, covariance=covariance, pca_dim=pca_dim, seed=0)
    assert probs.shape == (20, 2) and torch.allclose(probs.sum(dim=1), torch.ones(20, dtype=torch.float64))
    first, second = probs[:10].argmax(dim=1), probs[10:].argmax(dim=1)
    assert len(set(first.tolist())) == 1 and len(set(second.tolist())) == 1 and first[0] != second[0]
    assert float(probs.max(dim=1).values.min()) > 0.99


def test_gmm_memberships_degenerate_inputs_raise():
    """One client, or fewer clients than clusters, cannot be fitted (the strategy keeps old memberships)."""
    with pytest.raises(ValueError):
        gmm_memberships(torch.randn(1, 4), 2)
    with pytest.raises(ValueError):
        gmm_memberships(torch.randn(2, 4), 3)


def test_align_memberships_undoes_label_switching():
    """A refit that swaps component numbers is permuted back; uniform old memberships leave it unchanged."""
    old = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]], dtype=torch.float64)
    swapped = old[:, [1, 0]]
    assert torch.equal(align_memberships(swapped, old), old)
    uniform = torch.full((3, 2), 0.5, dtype=torch.float64)
    assert torch.equal(align_memberships(swapped, uniform), swapped)


@pytest.mark.parametrize("d_out,k,kind", [(384, 192, ROW_BITS), (384, 24, ROW_BITS), (384, 23, ROW_INDEX),
                                          (16, 1, ROW_BITS), (4096, 100, ROW_INDEX)])
def test_row_encoding_is_the_smaller_of_bitmap_and_indices(d_out, k, kind):
    """Bitmap ceil(d_out/8) bytes unless 2k int16 bytes are fewer (s < 1/16); decoding returns the rows."""
    rows = torch.randperm(d_out, generator=torch.Generator().manual_seed(k))[:k].sort().values
    control = encode_rows("m", rows, d_out)
    (name, tensor), = control.items()
    assert name == kind + "m"
    assert tensor.numel() * tensor.element_size() == ((d_out + 7) // 8 if kind == ROW_BITS else 2 * k)
    assert torch.equal(decode_rows(control, "m", d_out, k), rows)
    assert encode_rows("m", torch.arange(d_out), d_out) == {}
