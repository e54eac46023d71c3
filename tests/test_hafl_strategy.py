"""HAFL server strategy on hand-built adapters: downlinks, uplink validation, aggregation, importance, state."""

from __future__ import annotations

import pytest
import torch

from fs_gmfl.config.fields import make
from fs_gmfl.core.hafl import HAFLConfig, HAFLStrategy, build_uplink
from fs_gmfl.core.hafl.wire import INDICES, N_TRAIN, SCORES
from fs_gmfl.core.message import Message, Reply, samples_tensor

A1, B1 = "m.l0.q.lora_A.weight", "m.l0.q.lora_B.weight"
A2, B2 = "m.l0.v.lora_A.weight", "m.l0.v.lora_B.weight"
HEAD = "m.classifier.modules_to_save.weight"
R, D_IN, D_OUT = 4, 3, 2


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {A1: torch.randn(R, D_IN, generator=g), B1: torch.zeros(D_OUT, R), A2: torch.randn(R, D_IN, generator=g),
            B2: torch.zeros(D_OUT, R), HEAD: torch.ones(2, D_IN)}


def strategy(trained=(2, 4, 1), **cfg) -> HAFLStrategy:
    return HAFLStrategy(initial(), make(HAFLConfig, "hafl.", **cfg), trained=list(trained), lr=0.1)


def client_reply(s: HAFLStrategy, cid: int, down: Message, *, shift: float = 1.0, n_samples: int = 10) -> Reply:
    """What an honest client uploads: its selected components (+ head) moved by ``shift``."""
    factors = {k: v + shift for k, v in down.tensors.items()}
    msg = build_uplink(factors, s.pairs, s.pending[cid], rank=s.rank, num_samples=n_samples,
                       truncated=s.config.scheme == "truncation")
    return Reply(cid, msg)


def test_truncation_downlink_holds_selected_components_in_score_order():
    """Round 1 (all scores 0): a rank-2 client gets rows/columns 0, 1; scores travel; no n_train."""
    s = strategy(scheme="truncation")
    down = s.configure_round(1, [0, 1])
    assert down[0].tensors[A1].shape == (2, D_IN) and down[0].tensors[B1].shape == (D_OUT, 2)
    assert torch.equal(down[0].tensors[A1], initial()[A1][:2])
    assert down[1].tensors[A1].shape == (R, D_IN)
    assert HEAD not in down[0].tensors  # train_head False: the head is never sent
    assert set(down[0].control) == {SCORES} and down[0].control[SCORES].shape == (2, R)
    # bytes: 2 modules x 2 components x (3 + 2) floats + scores 2 x 4 floats
    assert down[0].payload_bytes == 2 * 2 * 5 * 4 and down[0].control_bytes == 2 * 4 * 4


def test_freezing_downlink_is_full_rank_with_n_train():
    """Freezing: every client gets the full factors, the scores and its n_k (2 bytes)."""
    s = strategy(scheme="freezing")
    down = s.configure_round(1, [2])[2]
    assert down.tensors[A1].shape == (R, D_IN)
    assert int(down.control[N_TRAIN]) == 1 and down.control[N_TRAIN].dtype == torch.int16


def test_uplink_bytes_are_components_and_indices():
    """A client with n_k = 2 uploads 2 x (3 + 2) floats per module, 2 x 2 int16 indices and the 8-byte count."""
    s = strategy(scheme="freezing")
    down = s.configure_round(1, [0])
    up = client_reply(s, 0, down[0]).message
    assert up.payload_bytes == 2 * 2 * 5 * 4
    assert up.control_bytes == 2 * 2 * 2 + 8
    assert up.control[INDICES].tolist() == [[0, 1], [0, 1]]


def test_adaptive_round_keeps_untrained_and_averages_by_contributors():
    """Clients n_k = 2 (shift +1) and n_k = 1 (shift +3), equal norms: comp 0 = mean, comp 1 = client 0's, comps 2-3 kept."""
    s = strategy(trained=(2, 1), weighting="uniform")
    down = s.configure_round(1, [0, 1])
    report = s.aggregate(1, [client_reply(s, 0, down[0], shift=1.0), client_reply(s, 1, down[1], shift=3.0)])
    assert report.accepted == [0, 1]
    init = initial()
    new = s.global_adapter()
    torch.testing.assert_close(new[A1][0], init[A1][0] + 2.0)
    torch.testing.assert_close(new[A1][1], init[A1][1] + 1.0)
    assert torch.equal(new[A1][2:], init[A1][2:]) and torch.equal(new[B1][:, 2:], init[B1][:, 2:])
    assert torch.equal(new[HEAD], init[HEAD])
    assert report.metrics["components_updated_fraction"] == 0.5


def test_zero_padding_round_shrinks_and_erases():
    """Zero-padding, uniform weights 1/2: comp 0 = mean, comp 1 = half of client 0's, untrained comps -> 0."""
    s = strategy(trained=(2, 1), weighting="uniform", aggregation="zero_padding")
    down = s.configure_round(1, [0, 1])
    s.aggregate(1, [client_reply(s, 0, down[0], shift=1.0), client_reply(s, 1, down[1], shift=3.0)])
    init, new = initial(), s.global_adapter()
    torch.testing.assert_close(new[A1][0], init[A1][0] + 2.0)
    torch.testing.assert_close(new[A1][1], (init[A1][1] + 1.0) / 2)
    assert torch.equal(new[A1][2:], torch.zeros(2, D_IN))


def test_norm_weights_follow_the_uploaded_product_norm():
    """Two clients training all components; B_k = c_k * 1, A_k = 1: weights c_k * ||11^T|| / sum -> 1:3."""
    s = strategy(trained=(4, 4))
    s.configure_round(1, [0, 1])
    ups = []
    for cid, c in ((0, 1.0), (1, 3.0)):
        tensors = {A1: torch.ones(R, D_IN), B1: torch.full((D_OUT, R), c), A2: torch.ones(R, D_IN) * c,
                   B2: torch.ones(D_OUT, R)}
        control = {INDICES: torch.arange(R).repeat(2, 1).to(torch.int16), "num_samples": samples_tensor(5)}
        ups.append(Reply(cid, Message(tensors, control)))
    s.aggregate(1, ups)
    assert torch.allclose(s.global_state[B1], torch.full((D_OUT, R), (1 * 1 + 3 * 3) / 4))
    assert torch.allclose(s.global_state[A2], torch.full((R, D_IN), 2.5))


def _tamper(field):
    def apply(msg: Message):
        if field == "range":
            msg.control[INDICES][0, 0] = R
        elif field == "duplicate":
            msg.control[INDICES][0] = torch.tensor([1, 1])
        elif field == "count":
            msg.control[INDICES] = msg.control[INDICES][:, :1]
        elif field == "unassigned":
            msg.control[INDICES][0] = torch.tensor([0, 3])
        elif field == "float_indices":
            msg.control[INDICES] = msg.control[INDICES].float()
        elif field == "missing_indices":
            del msg.control[INDICES]
        elif field == "extra_control":
            msg.control["seed"] = torch.tensor(1)
        elif field == "shape":
            msg.tensors[A1] = torch.zeros(3, D_IN)
        elif field == "nan":
            msg.tensors[B2] = torch.full((D_OUT, 2), float("nan"))
        elif field == "extra_tensor":
            msg.tensors[HEAD] = torch.ones(2, D_IN)
        elif field == "samples":
            msg.control["num_samples"] = samples_tensor(0)
    return apply


@pytest.mark.parametrize("field,reason", [
    ("range", "outside [0, 4)"), ("duplicate", "duplicate"), ("count", "modules x n_k"), ("unassigned", "differ"),
    ("float_indices", "integer"), ("missing_indices", "missing"), ("extra_control", "unexpected control"),
    ("shape", "shape"), ("nan", "non-finite"), ("extra_tensor", "key mismatch"), ("samples", "not positive"),
])
def test_malformed_uplink_is_rejected_without_touching_the_model(field, reason):
    """A bad upload is rejected with a reason; the honest client's update alone is applied."""
    s = strategy(trained=(2, 2))
    down = s.configure_round(1, [0, 1])
    bad, good = client_reply(s, 0, down[0], shift=9.0), client_reply(s, 1, down[1], shift=1.0)
    _tamper(field)(bad.message)
    report = s.aggregate(1, [bad, good])
    assert reason in report.rejected[0] and report.accepted == [1]
    expected = initial()[A1][:2] + 1.0
    torch.testing.assert_close(s.global_state[A1][:2], expected)


def test_unsampled_client_and_empty_round_change_nothing():
    """A reply from a client not sampled this round is rejected; a round without valid replies keeps the model."""
    s = strategy()
    down = s.configure_round(1, [0])
    report = s.aggregate(1, [client_reply(s, 0, down[0]), Reply(5, down[0])])
    assert 5 in report.rejected and "not sampled" in report.rejected[5]
    before = s.global_adapter()
    s.configure_round(2, [0])
    s.aggregate(2, [])
    assert all(torch.equal(before[k], s.global_state[k]) for k in before)
    assert s.tracker.updates == 1


def test_scores_select_the_components_that_moved():
    """After a round where only components 2 and 3 changed, a rank-2 client is sent 2 and 3 (larger move first)."""
    s = strategy(trained=(2, 4), scheme="truncation")
    s.configure_round(1, [1])
    tensors = {k: v.clone() for k, v in initial().items() if k != HEAD}
    for a, b in ((A1, B1), (A2, B2)):
        tensors[a][2] += 0.5
        tensors[a][3] += 1.0
        tensors[b][:, 2:] += 1.0
    control = {INDICES: torch.arange(R).repeat(2, 1).to(torch.int16), "num_samples": samples_tensor(3)}
    s.aggregate(1, [Reply(1, Message(tensors, control))])
    down = s.configure_round(2, [0])[0]
    assert s.pending[0].tolist() == [[3, 2], [3, 2]]
    assert torch.equal(down.tensors[A1], s.global_state[A1][[3, 2]])


def test_train_head_averages_the_head_by_samples():
    """train_head: the head travels both ways and is sample-weighted (1:3)."""
    s = strategy(trained=(2, 2), train_head=True)
    down = s.configure_round(1, [0, 1])
    assert HEAD in down[0].tensors
    s.aggregate(1, [client_reply(s, 0, down[0], shift=1.0, n_samples=1),
                    client_reply(s, 1, down[1], shift=5.0, n_samples=3)])
    assert torch.allclose(s.global_state[HEAD], torch.full((2, D_IN), 1 + (1 * 1 + 3 * 5) / 4))


def test_client_training_nothing_is_accepted_but_not_aggregated():
    """n_k = 0 (freezing with n_min 0): uploads only indices of shape (modules, 0) and changes nothing."""
    s = strategy(trained=(0, 2))
    down = s.configure_round(1, [0, 1])
    up0 = client_reply(s, 0, down[0])
    assert up0.message.tensors == {} and up0.message.control[INDICES].shape == (2, 0)
    report = s.aggregate(1, [up0, client_reply(s, 1, down[1], shift=1.0)])
    assert report.accepted == [0, 1]
    torch.testing.assert_close(s.global_state[A1][:2], initial()[A1][:2] + 1.0)


def test_truncated_evaluation_adapters():
    """eval_truncated_ranks: rank_<n> for each n_k < r_max keeps exactly the top-n components."""
    s = strategy(trained=(2, 4, 1), eval_truncated_ranks=True)
    adapters = s.evaluation_adapters()
    assert sorted(adapters) == ["rank_1", "rank_2"]
    assert torch.equal(adapters["rank_2"][A1][:2], s.global_state[A1][:2])
    assert torch.equal(adapters["rank_2"][A1][2:], torch.zeros(2, D_IN))


def test_truncated_evaluation_with_per_rank_scaling_rescales_b():
    """peft_per_rank: a rank-2 client scales by alpha/2 = 2x the global alpha/4, so kept B columns double."""
    s = strategy(trained=(2, 4), eval_truncated_ranks=True, scaling="peft_per_rank")
    s.global_state[B1] = torch.randn(D_OUT, R, generator=torch.Generator().manual_seed(1))
    adapters = s.evaluation_adapters()
    assert set(adapters) == {"rank_2"}
    torch.testing.assert_close(adapters["rank_2"][B1][:, :2], 2.0 * s.global_state[B1][:, :2])


def test_state_dict_round_trip_continues_identically():
    """save -> load into a fresh strategy -> two more rounds equal the uninterrupted run."""
    def play(s: HAFLStrategy, rounds):
        for rnd in rounds:
            down = s.configure_round(rnd, [0, 1, 2])
            s.aggregate(rnd, [client_reply(s, c, down[c], shift=0.1 * (c + rnd)) for c in (0, 1, 2)])

    a = strategy()
    play(a, [1, 2])
    b = strategy()
    b.load_state_dict(a.state_dict())
    play(a, [3, 4])
    play(b, [3, 4])
    assert all(torch.equal(a.global_state[k], b.global_state[k]) for k in a.global_state)
    assert torch.equal(a.tracker.scores(), b.tracker.scores())
