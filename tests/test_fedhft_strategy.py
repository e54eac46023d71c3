"""FedHFT server: streamed masked averaging, clustering, validation, personalised downlinks, checkpoints."""

from __future__ import annotations

import pytest
import torch

from fs_gmfl.config.fields import make
from fs_gmfl.core.fedhft import FedHFTConfig, FedHFTStrategy, uplink_message
from fs_gmfl.core.fedhft.wire import LEVEL, ROW_BITS, ROW_INDEX, SEED
from fs_gmfl.core.message import NUM_SAMPLES, Message, Reply, pack_bits, samples_tensor
from tests.reference_aggregation import masked_mixture_average

Q, V = "m.l0.q", "m.l0.v"
HEAD = "m.classifier.modules_to_save.weight"


def adapter(d_out: int = 6, d_in: int = 5, r: int = 2, head: tuple[int, int] = (3, 4)) -> dict[str, torch.Tensor]:
    out = {}
    for mod in (Q, V):
        out[f"{mod}.lora_A.weight"] = torch.zeros(r, d_in)
        out[f"{mod}.lora_B.weight"] = torch.zeros(d_out, r)
    out[HEAD] = torch.zeros(head)
    return out


def strategy(initial, *, clients: int, keep=(1.0,), share=(1.0,), scaling: float = 1.0, **cfg) -> FedHFTStrategy:
    config = make(FedHFTConfig, levels={"keep_ratio": list(keep), "client_share": list(share)}, **cfg)
    return FedHFTStrategy(config, initial, num_clients=clients, scaling=scaling, seed=0)


def upload(strat: FedHFTStrategy, cid: int, factors: dict[str, torch.Tensor], head: torch.Tensor, n: int = 4,
           rows: dict[str, torch.Tensor] | None = None) -> Reply:
    """An uplink of client ``cid``: full A, the given (or top) rows of B, the head."""
    layout = strat.layout
    kept = strat.kept_rows(cid)
    rows = rows or {p.module: torch.arange(kept[p.module]) for p in layout.pairs}
    a = {p.a_key: factors[p.a_key] for p in layout.pairs}
    b_rows = {p.b_key: factors[p.b_key][rows[p.module]] for p in layout.pairs}
    return Reply(cid, uplink_message(layout, a, b_rows, rows, {HEAD: head}, n))


def aggregate(strat: FedHFTStrategy, rnd: int, replies: list[Reply]):
    """Open round ``rnd`` for the known clients among the repliers (as a host's configure_round does), aggregate."""
    strat.configure_round(rnd, sorted({r.client_id for r in replies if 0 <= r.client_id < strat.num_clients}))
    return strat.aggregate(rnd, replies)


def random_factors(g: torch.Generator, initial) -> dict[str, torch.Tensor]:
    return {k: torch.randn(v.shape, generator=g) for k, v in initial.items() if ".lora_" in k}


def test_streamed_average_matches_hand_computed_reference():
    """Three clients (s = 1, 0.5, 0.5), K = 2, hand-set memberships: G_j equals the hand-computed Ū_j."""
    # Prepare: d_out = d_in = 2, r = 1, A = [1, 1], B_i = [[1],[2]], [[3],[4]], [[5],[6]] -> ΔW_i rows [x, x].
    initial = {f"{Q}.lora_A.weight": torch.zeros(1, 2), f"{Q}.lora_B.weight": torch.zeros(2, 1),
               HEAD: torch.zeros(1, 2)}
    expected = {"count": [[[1.25, 1.25], [1.0, 1.0]], [[0.75, 0.75], [3.0, 3.0]]],
                "soft": [[[5 / 3, 5 / 3], [2.0, 2.0]], [[3.0, 3.0], [6.0, 6.0]]]}
    for norm, want in expected.items():
        strat = strategy(initial, clients=3, keep=(1.0, 0.5), share=(0.5, 0.5), num_clusters=2, norm=norm)
        strat.levels = [0, 1, 1]
        strat.memberships = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
        a = torch.ones(1, 2)
        replies = [upload(strat, 0, {f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": torch.tensor([[1.0], [2.0]])},
                          torch.zeros(1, 2)),
                   upload(strat, 1, {f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": torch.tensor([[3.0], [4.0]])},
                          torch.zeros(1, 2), rows={Q: torch.tensor([0])}),
                   upload(strat, 2, {f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": torch.tensor([[5.0], [6.0]])},
                          torch.zeros(1, 2), rows={Q: torch.tensor([1])})]
        # Execute
        report = aggregate(strat, 1, replies)
        # Assert
        assert report.accepted == [0, 1, 2]
        for j in range(2):
            assert torch.allclose(strat.cumulative[j][Q], torch.tensor(want[j])), (norm, j)


@pytest.mark.parametrize("norm,weighting", [("count", "uniform"), ("soft", "samples")])
def test_streaming_matches_reference_in_float64(norm, weighting):
    """Random factors, masks (s = 1, 0.5, 0.25) and memberships: streamed G_j == reference on dense products."""
    g = torch.Generator().manual_seed(0)
    initial = adapter(d_out=8, d_in=6, r=3)
    strat = strategy(initial, clients=5, keep=(1.0, 0.5, 0.25), share=(0.4, 0.4, 0.2), scaling=0.5,
                     num_clusters=3, norm=norm, client_weighting=weighting)
    strat.memberships = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    replies, dense, masks = [], {Q: [], V: []}, {Q: [], V: []}
    for cid in range(5):
        f = random_factors(g, initial)
        kept = strat.kept_rows(cid)
        rows = {m: torch.randperm(8, generator=g)[:kept[m]].sort().values for m in (Q, V)}
        replies.append(upload(strat, cid, f, torch.randn(3, 4, generator=g), n=cid + 1, rows=rows))
        for m in (Q, V):
            dense[m].append(0.5 * f[f"{m}.lora_B.weight"] @ f[f"{m}.lora_A.weight"])
            masks[m].append(torch.zeros(8, dtype=torch.bool).index_fill(0, rows[m], True))
    weights = [c + 1 for c in range(5)] if weighting == "samples" else None
    aggregate(strat, 1, replies)
    for m in (Q, V):
        reference = masked_mixture_average(dense[m], masks[m], strat.memberships, weights=weights, norm=norm)
        for j in range(3):
            assert torch.allclose(strat.cumulative[j][m].to(torch.float64), reference[j], atol=1e-6)


def test_one_cluster_full_keep_reduces_to_fedavg_of_products():
    """K = 1, s = 1: each round adds the FedAvg of the dense s·B_i·A_i; samples weighting gives the weighted mean."""
    g = torch.Generator().manual_seed(1)
    initial = adapter()
    for weighting in ("uniform", "samples"):
        strat = strategy(initial, clients=3, scaling=2.0, client_weighting=weighting)
        total = {Q: torch.zeros(6, 5, dtype=torch.float64), V: torch.zeros(6, 5, dtype=torch.float64)}
        for rnd in (1, 2):
            factors = [random_factors(g, initial) for _ in range(3)]
            counts = [1, 2, 5]
            aggregate(strat, rnd, [upload(strat, c, f, torch.zeros(3, 4), n=counts[c]) for c, f in enumerate(factors)])
            w = torch.tensor(counts if weighting == "samples" else [1, 1, 1], dtype=torch.float64)
            for m in (Q, V):
                products = [2.0 * f[f"{m}.lora_B.weight"].double() @ f[f"{m}.lora_A.weight"].double() for f in factors]
                total[m] += sum(wi * p for wi, p in zip(w, products)) / w.sum()
        for m in (Q, V):
            assert torch.allclose(strat.cumulative[0][m].double(), total[m], atol=1e-5)


def test_personalised_factors_have_rank_r_and_mix_clusters():
    """The downlink factors are r-column/r-row and B̃Ã is the best rank-r approximation of Σ_j π_ij G_j."""
    initial = adapter(r=2)
    strat = strategy(initial, clients=2, num_clusters=2, svd="exact")
    g = torch.Generator().manual_seed(3)
    strat.cumulative = [{m: torch.randn(6, 5, generator=g) for m in (Q, V)} for _ in range(2)]
    strat.rounds_aggregated = 1
    strat.memberships = torch.tensor([[0.25, 0.75], [1.0, 0.0]], dtype=torch.float64)
    down = strat.configure_round(2, [0, 1])
    for cid, pi in ((0, [0.25, 0.75]), (1, [1.0, 0.0])):
        b, a = down[cid].tensors[f"{Q}.lora_B.weight"], down[cid].tensors[f"{Q}.lora_A.weight"]
        assert b.shape == (6, 2) and a.shape == (2, 5)
        mix = pi[0] * strat.cumulative[0][Q] + pi[1] * strat.cumulative[1][Q]
        s = torch.linalg.svdvals(mix)
        assert int(torch.linalg.matrix_rank(b @ a)) <= 2
        assert torch.isclose(torch.linalg.norm(mix - b @ a), s[2:].norm(), rtol=1e-4)


def test_downlink_contents_and_bytes():
    """Round 1: head + level + seed only; later: factors r(d_in + d_out) per module + head (fp32), 9 control bytes."""
    initial = adapter(d_out=6, d_in=5, r=2)
    strat = strategy(initial, clients=2)
    first = strat.configure_round(1, [0])[0]
    assert set(first.tensors) == {HEAD} and set(first.control) == {LEVEL, SEED}
    assert first.payload_bytes == 12 * 4 and first.control_bytes == 1 + 8
    aggregate(strat, 1, [upload(strat, 0, random_factors(torch.Generator().manual_seed(0), initial), torch.ones(3, 4))])
    later = strat.configure_round(2, [0, 1])
    assert later[0].payload_bytes == (2 * 2 * (6 + 5) + 12) * 4 and later[0].control_bytes == 9
    assert later[0].control[SEED] != later[1].control[SEED]


def test_clusters_are_independent_accumulators():
    """Hard memberships: each cluster holds only its own client's update (no aliasing, no doubling in round 1)."""
    initial = adapter()
    strat = strategy(initial, clients=2, num_clusters=2, norm="soft")
    strat.memberships = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    f0, f1 = random_factors(g, initial), random_factors(g, initial)
    aggregate(strat, 1, [upload(strat, 0, f0, torch.ones(3, 4)), upload(strat, 1, f1, torch.full((3, 4), 3.0))])
    assert strat.cumulative[0][Q] is not strat.cumulative[1][Q]
    assert torch.allclose(strat.cumulative[0][Q], f0[f"{Q}.lora_B.weight"] @ f0[f"{Q}.lora_A.weight"], atol=1e-6)
    assert torch.allclose(strat.cumulative[1][Q], f1[f"{Q}.lora_B.weight"] @ f1[f"{Q}.lora_A.weight"], atol=1e-6)
    assert torch.equal(strat.heads[0][HEAD], torch.ones(3, 4)) and torch.equal(strat.heads[1][HEAD], torch.full((3, 4), 3.0))


def tamper(kind: str, message: Message) -> Message:
    """A malformed copy of a level-0.5 uplink (d_out = 6, k = 3, bitmap-encoded rows)."""
    m = message.detached_copy()
    bits_key = next(k for k in m.control if k.startswith(ROW_BITS))
    if kind == "extra_b_row":
        m.tensors[f"{Q}.lora_B.weight"] = torch.zeros(4, 2)
    elif kind == "popcount":
        m.control[bits_key] = pack_bits([True] * 4 + [False] * 2)
    elif kind == "padding_bits":
        m.control[bits_key] = m.control[bits_key] | torch.tensor([128], dtype=torch.uint8)
    elif kind == "nan":
        m.tensors[f"{V}.lora_A.weight"][0, 0] = float("nan")
    elif kind == "missing_head":
        del m.tensors[HEAD]
    elif kind == "both_encodings":
        m.control[ROW_INDEX + Q] = torch.tensor([0, 1, 2], dtype=torch.int16)
    elif kind == "unsorted_indices":
        del m.control[bits_key]
        m.control[ROW_INDEX + bits_key[len(ROW_BITS):]] = torch.tensor([2, 0, 1], dtype=torch.int16)
    elif kind == "zero_samples":
        m.control[NUM_SAMPLES] = samples_tensor(0)
    elif kind == "huge":
        m.tensors[HEAD] = torch.full((3, 4), 1e9)
    return m


@pytest.mark.parametrize("kind,reason", [
    ("extra_b_row", "shape"), ("popcount", "keeps 4 rows"), ("padding_bits", "padding"), ("nan", "non-finite"),
    ("missing_head", "key mismatch"), ("both_encodings", "exactly one"), ("unsorted_indices", "increasing"),
    ("zero_samples", "not positive"), ("huge", "magnitude")])
def test_malformed_uploads_are_rejected_without_side_effects(kind, reason):
    """A malformed upload is rejected with its reason; the state equals a round with the good upload only."""
    initial = adapter()
    g = torch.Generator().manual_seed(5)
    good, bad_factors = random_factors(g, initial), random_factors(g, initial)
    runs = []
    for with_bad in (False, True):
        strat = strategy(initial, clients=2, keep=(0.5,), num_clusters=1)
        replies = [upload(strat, 0, good, torch.ones(3, 4))]
        if with_bad:
            replies.append(Reply(1, tamper(kind, upload(strat, 1, bad_factors, torch.ones(3, 4)).message)))
        report = aggregate(strat, 1, replies)
        runs.append(strat)
    assert report.accepted == [0] and reason in report.rejected[1]
    assert all(torch.equal(runs[0].cumulative[0][m], runs[1].cumulative[0][m]) for m in (Q, V))
    assert torch.equal(runs[0].heads[0][HEAD], runs[1].heads[0][HEAD])


def test_full_keep_clients_must_not_send_a_mask_and_unknown_ids_are_rejected():
    """s = 1: a row mask is an unexpected entry; a client id outside [0, N) (never sampled) is rejected."""
    initial = adapter()
    strat = strategy(initial, clients=2)
    reply = upload(strat, 0, random_factors(torch.Generator().manual_seed(6), initial), torch.ones(3, 4))
    reply.message.control[ROW_BITS + Q] = pack_bits([True] * 6)
    report = aggregate(strat, 1, [reply, Reply(7, reply.message)])
    assert "unexpected control" in report.rejected[0] and "not sampled" in report.rejected[7]
    assert strat.rounds_aggregated == 0 and not strat.cumulative[0][Q].any()


def clustered_round(strat: FedHFTStrategy, rnd: int, clients, seed: int = 0):
    """Two groups of clients with opposite heads, so the mixture separates them."""
    g = torch.Generator().manual_seed(seed + rnd)
    initial = adapter()
    replies = [upload(strat, c, random_factors(g, initial), (1 if c % 2 else -1) * 5.0 + torch.randn(3, 4, generator=g))
               for c in clients]
    return aggregate(strat, rnd, replies)


def test_memberships_follow_the_mixture_after_warmup():
    """No clustering during warm-up; afterwards the two head groups get (near) one-hot, distinct memberships."""
    strat = strategy(adapter(), clients=6, num_clusters=2, cluster_warmup_rounds=1, cluster_features="head_pca",
                     cluster_pca_dim=2)
    clustered_round(strat, 1, range(6))
    assert torch.equal(strat.memberships, torch.full((6, 2), 0.5, dtype=torch.float64))
    report = clustered_round(strat, 2, range(6))
    assert report.metrics["clustering_skipped"] == 0.0
    hard = strat.memberships.argmax(dim=1)
    assert len(set(hard[0::2].tolist())) == 1 and len(set(hard[1::2].tolist())) == 1 and hard[0] != hard[1]
    assert float(strat.memberships.max(dim=1).values.min()) > 0.99


@pytest.mark.parametrize("participants,clusters", [([3], 2), ([0, 1], 3)])
def test_degenerate_rounds_keep_memberships(participants, clusters):
    """One participant, or fewer participants than clusters: memberships unchanged, the round is flagged."""
    strat = strategy(adapter(), clients=4, num_clusters=clusters, cluster_warmup_rounds=0)
    before = strat.memberships.clone()
    report = clustered_round(strat, 1, participants)
    assert report.metrics["clustering_skipped"] == 1.0 and torch.equal(strat.memberships, before)
    assert strat.rounds_aggregated == 1


def test_state_dict_round_trip_resumes_exactly():
    """Save after 2 rounds, load into a fresh strategy: rounds 3-4 give bit-identical state and downlinks."""
    kwargs = dict(clients=6, keep=(1.0, 0.5), share=(0.5, 0.5), num_clusters=2, cluster_warmup_rounds=1,
                  cluster_features="head_pca", cluster_pca_dim=2)
    straight = strategy(adapter(), **kwargs)
    for rnd in (1, 2):
        clustered_round(straight, rnd, range(6))
    resumed = strategy(adapter(), **kwargs)
    resumed.load_state_dict(straight.state_dict())
    for rnd in (3, 4):
        clustered_round(straight, rnd, range(6))
        clustered_round(resumed, rnd, range(6))
    assert torch.equal(straight.memberships, resumed.memberships) and straight.levels == resumed.levels
    for j in range(2):
        assert all(torch.equal(straight.cumulative[j][m], resumed.cumulative[j][m]) for m in (Q, V))
        assert torch.equal(straight.heads[j][HEAD], resumed.heads[j][HEAD])
    d1, d2 = straight.configure_round(5, [0, 3]), resumed.configure_round(5, [0, 3])
    assert all(torch.equal(d1[c].tensors[k], d2[c].tensors[k]) for c in d1 for k in d1[c].tensors)


def test_adapter_form_reproduces_the_merged_start():
    """Evaluation loads Ã and B̃/scaling as LoRA: scaling·(B̃/scaling)·Ã equals the downlink's B̃Ã."""
    strat = strategy(adapter(), clients=2, scaling=4.0, num_clusters=2)
    clustered_round(strat, 1, [0, 1])
    form = strat.adapter_form(strat.memberships[0])
    down = strat.configure_round(2, [0])[0]
    for m in (Q, V):
        merged = down.tensors[f"{m}.lora_B.weight"] @ down.tensors[f"{m}.lora_A.weight"]
        assert torch.allclose(4.0 * form[f"{m}.lora_B.weight"] @ form[f"{m}.lora_A.weight"], merged, atol=1e-6)
    assert torch.equal(form[HEAD], down.tensors[HEAD])


def test_uplink_survives_the_federatedscope_wire_format():
    """Every FedHFT control dtype (int16 row indices, uint8 bitmaps and level, int64 seed) crosses the FS wire."""
    from fs_gmfl.hosts.fs import wire

    strat = strategy(adapter(d_out=6), clients=1, keep=(0.25,))
    up = upload(strat, 0, random_factors(torch.Generator().manual_seed(7), adapter(d_out=6)), torch.ones(3, 4))
    up.message.control[ROW_INDEX + Q] = torch.tensor([2, 5], dtype=torch.int16)
    down = strat.configure_round(1, [0])[0]
    for message, kind in ((up.message, "uplink"), (down, "downlink")):
        back = wire.decode(wire.encode(message, kind), expect=kind)
        assert all(torch.equal(back.control[k], v) and back.control[k].dtype == v.dtype
                   for k, v in message.control.items())
