"""FedAvg of adapters and the FedIT / FFA-LoRA strategy (+GMFL) on hand-built tensors."""

from __future__ import annotations

import pytest
import torch

from fs_gmfl.config.fields import make
from fs_gmfl.core.fedavg import LoraFedAvg, base_trainable_keys, mask_candidate_keys
from fs_gmfl.core.gmfl import GlobalMasking, GMFLConfig
from fs_gmfl.core.message import Message, Reply, samples_tensor, unpack_bits
from fs_gmfl.errors import AggregationError
from tests.gmfl_parts import gmfl_over_lora_fedavg
from tests import reference_aggregation as reference
from tests import streamed_aggregation as streamed

A1, B1 = "m.l1.q.lora_A.weight", "m.l1.q.lora_B.weight"
A2, B2 = "m.l1.v.lora_A.weight", "m.l1.v.lora_B.weight"
HEAD = "m.classifier.modules_to_save.weight"
KEYS = [A1, B1, A2, B2, HEAD]


def state(value: float) -> dict[str, torch.Tensor]:
    return {A1: torch.full((2, 3), value), B1: torch.full((3, 2), value), A2: torch.full((2, 3), value),
            B2: torch.full((3, 2), value), HEAD: torch.full((2, 3), value)}


def reply(cid: int, tensors: dict[str, torch.Tensor], n: int) -> Reply:
    return Reply(cid, Message(tensors, {"num_samples": samples_tensor(n)}))


#: FedAvg as the list-form reference and as the production running sum fed the same list.
AVERAGES = pytest.mark.parametrize("weighted_average", [reference.weighted_average, streamed.weighted_average],
                                   ids=["reference", "streamed"])


@AVERAGES
def test_weighted_average_hand_computed(weighted_average):
    """Weights 1 and 3: (1*2 + 3*6) / 4 = 5."""
    # Prepare
    s1, s2 = {"x": torch.tensor([2.0, 0.0])}, {"x": torch.tensor([6.0, 4.0])}
    # Execute
    avg = weighted_average([s1, s2], [1, 3])
    # Assert
    assert torch.equal(avg["x"], torch.tensor([5.0, 3.0]))


@AVERAGES
def test_weighted_average_does_not_mutate_inputs(weighted_average):
    """Inputs are bit-identical after the call (FederatedScope's averaging mutates its first input)."""
    s1, s2 = {"x": torch.randn(4)}, {"x": torch.randn(4)}
    before = [s1["x"].clone(), s2["x"].clone()]
    weighted_average([s1, s2], [2, 5])
    assert torch.equal(s1["x"], before[0]) and torch.equal(s2["x"], before[1])


@AVERAGES
@pytest.mark.parametrize("weights", [[], [0, 0], [1, -1], [1, float("nan")]])
def test_weighted_average_rejects_degenerate_weights(weighted_average, weights):
    """No, zero, negative or non-finite weights raise AggregationError."""
    states = [{"x": torch.ones(1)} for _ in weights] or [{"x": torch.ones(1)}]
    with pytest.raises(AggregationError):
        weighted_average(states[: len(weights)] if weights else [], weights)


def test_base_keys_per_variant():
    """FedIT trains everything; FFA-LoRA never trains lora_A; GMFL candidates exclude the head."""
    assert base_trainable_keys(KEYS, "fedit") == KEYS
    assert base_trainable_keys(KEYS, "ffa_lora") == [B1, B2, HEAD]
    assert mask_candidate_keys(KEYS, "fedit") == [A1, B1, A2, B2]
    assert mask_candidate_keys(KEYS, "ffa_lora") == [B1, B2]


def test_fedit_aggregation_is_sample_weighted():
    """Two clients with 1 and 3 samples: global = (1*s1 + 3*s2) / 4 for every key."""
    strat = LoraFedAvg(state(0.0))
    strat.configure_round(1, [0, 1])
    strat.aggregate(1, [reply(0, state(2.0), 1), reply(1, state(6.0), 3)])
    for key in KEYS:
        assert torch.allclose(strat.global_state[key], torch.full_like(state(0.0)[key], 5.0))


def test_downlinks_of_a_round_share_one_copy_of_the_global_adapter():
    """1,000 sampled clients cost one adapter copy on the server, not 1,000; the copy is not the global state."""
    strat = LoraFedAvg(state(1.0))
    downlinks = strat.configure_round(1, list(range(1000)))
    pointers = {key: {m.tensors[key].data_ptr() for m in downlinks.values()} for key in KEYS}
    assert all(len(p) == 1 for p in pointers.values())
    assert all(next(iter(pointers[k])) != strat.global_state[k].data_ptr() for k in KEYS)
    downlinks[0].tensors[A1].fill_(99.0)  # a host that wrote into a downlink cannot touch the global model
    assert torch.equal(strat.global_state[A1], state(1.0)[A1])


def test_frozen_tensors_keep_their_value_and_must_not_be_uploaded():
    """With A1 frozen, the server expects the other keys only; A1 keeps its global value."""
    masking = GlobalMasking(make(GMFLConfig, use=True), mask_candidate_keys(KEYS, "fedit"))
    masking.frozen = {A1}
    strat = gmfl_over_lora_fedavg(state(1.0), masking)
    up = {k: v for k, v in state(3.0).items() if k != A1}
    strat.configure_round(1, [0])
    report = strat.aggregate(1, [reply(0, up, 4)])
    assert report.accepted == [0]
    assert torch.equal(strat.global_state[A1], state(1.0)[A1])
    assert torch.equal(strat.global_state[B1], state(3.0)[B1])


@pytest.mark.parametrize("mutate,reason", [
    (lambda t: t.pop(B1), "key mismatch"),
    (lambda t: t.__setitem__("extra", torch.ones(1)), "key mismatch"),
    (lambda t: t.__setitem__(B1, torch.ones(4, 2)), "shape"),
    (lambda t: t.__setitem__(B1, torch.ones(3, 2, dtype=torch.float64)), "dtype"),
    (lambda t: t.__setitem__(B1, torch.full((3, 2), float("nan"))), "non-finite"),
    (lambda t: t.__setitem__(B1, torch.full((3, 2), 1e9)), "magnitude"),
])
def test_malformed_update_is_rejected_and_changes_nothing(mutate, reason):
    """A bad payload is rejected with a reason and the global model is untouched; good ones still count."""
    strat = LoraFedAvg(state(1.0))
    bad = state(9.0)
    mutate(bad)
    strat.configure_round(1, [0, 1])
    report = strat.aggregate(1, [reply(0, bad, 5), reply(1, state(3.0), 5)])
    assert reason in report.rejected[0] and report.accepted == [1]
    assert all(torch.equal(strat.global_state[k], state(3.0)[k]) for k in KEYS)


def test_round_without_valid_replies_leaves_model_unchanged():
    """All replies rejected (or none): the global state is unchanged, nothing divides by zero."""
    strat = LoraFedAvg(state(1.0))
    strat.aggregate(1, [reply(0, state(2.0), 0)])
    strat.aggregate(2, [])
    assert all(torch.equal(strat.global_state[k], state(1.0)[k]) for k in KEYS)


def test_stateless_downlink_sends_everything_and_the_mask():
    """Stateless: every key every time; the mask (4 candidates -> 1 byte) once a refresh happened."""
    masking = GlobalMasking(make(GMFLConfig, use=True, period=1, c=0.25, beta=0.0), mask_candidate_keys(KEYS, "fedit"))
    strat = gmfl_over_lora_fedavg(state(0.0), masking)
    first = strat.configure_round(1, [0])[0]
    assert set(first.tensors) == set(KEYS) and first.control == {}
    strat.aggregate(1, [reply(0, {**state(1.0), A1: torch.zeros(2, 3) + 1e-6}, 1)])
    second = strat.configure_round(2, [0])[0]
    assert set(second.tensors) == set(KEYS)
    assert unpack_bits(second.control["mask"], 4).tolist() == [False, True, True, True]  # 0.25 * 4 = 1 frozen: A1


def test_stateful_sync_sends_only_stale_tensors():
    """stateful_sync: a client gets what changed since its last sync; a frozen tensor once more, then never."""
    cand = mask_candidate_keys(KEYS, "fedit")
    masking = GlobalMasking(make(GMFLConfig, use=True, period=1, c=0.25, beta=0.0), cand)
    strat = gmfl_over_lora_fedavg(state(0.0), masking, downlink="stateful_sync")
    assert set(strat.configure_round(1, [0, 1])[0].tensors) == set(KEYS)  # first contact: everything
    # round 1: only client 0 answers; A1 moves least -> frozen (ratio 0.25 of 4 tensors = 1)
    up = {k: v + (0.01 if k == A1 else 1.0) for k, v in state(0.0).items()}
    strat.aggregate(1, [reply(0, up, 1)])
    assert masking.frozen == {A1}
    down = strat.configure_round(2, [0, 1])
    assert set(down[0].tensors) == set(KEYS)  # all five changed in round 1 (A1 changed, then froze)
    assert "mask" in down[0].control
    up2 = {k: v + 1.0 for k, v in strat.global_state.items() if k != A1}
    strat.aggregate(2, [reply(0, up2, 1), reply(1, up2, 1)])
    down3 = strat.configure_round(3, [0])[0]
    assert set(down3.tensors) == set(KEYS) - {A1}  # A1 frozen and unchanged since the last sync
    assert "mask" not in down3.control  # the mask did not change since the last sync


@pytest.mark.parametrize("rule,mode,expected", [
    ("shard_size", "batch", None), ("processed_samples", "batch", 24), ("processed_samples", "epoch", None)])
def test_processed_samples_cap_is_batch_size_times_steps(rule, mode, expected):
    """batch 8 x 3 steps = 24 processed samples at most; an epoch processes the whole shard; shard_size: no cap."""
    from fs_gmfl.core.fedavg.client import processed_samples_cap
    assert processed_samples_cap(rule, batch_size=8, local_steps=3, batch_or_epoch=mode) == expected


def test_processed_samples_weighting_gives_min_of_processed_and_shard():
    """Shards of 40 and 10, cap 24: reported 24 and 10, global = (24 * 1 + 10 * 5) / 34 (shard size: 40, 10)."""
    from torch import nn

    from fs_gmfl.core.fedavg import LoraClient
    from fs_gmfl.core.protocol import LocalPlan, TrainStats

    def upload(client, value, n):
        plan = LocalPlan(model=nn.Identity(), trainable={k: torch.nn.Parameter(v) for k, v in state(value).items()})
        return client.finish(plan, TrainStats(num_samples=n, steps=3, mean_loss=0.0), {})

    expected = {None: (40 * 1 + 10 * 5) / 50, 24: (24 * 1 + 10 * 5) / 34}
    for cap, value in expected.items():
        client = LoraClient("fedit", samples_cap=cap)
        uploads = [upload(client, 1.0, 40), upload(client, 5.0, 10)]
        assert [u.num_samples for u in uploads] == ([40, 10] if cap is None else [24, 10])
        strategy = LoraFedAvg(state(0.0))
        strategy.configure_round(1, [0, 1])
        strategy.aggregate(1, [Reply(0, uploads[0]), Reply(1, uploads[1])])
        assert strategy.global_adapter()[A1][0, 0].item() == pytest.approx(value)


def test_client_weight_key_reaches_the_client_and_is_rejected_for_other_methods(tiny):
    """federate.client_weight processed_samples: the FedIT client caps at 8 x 3 = 24; HAFL refuses the key."""
    from fs_gmfl.core.adapter import adapter_state
    from fs_gmfl.errors import ConfigError
    from fs_gmfl.hosts.common.models import build_backbone
    from fs_gmfl.methods import MethodContext, build_method

    cfg = tiny("federate.client_weight", "processed_samples", "gmfl.use", "True")
    method = build_method(MethodContext(cfg, adapter_state(build_backbone(cfg, 2).model)))
    assert method.client.samples_cap == 24
    assert build_method(MethodContext(tiny(), method.strategy.global_adapter())).client.samples_cap is None
    with pytest.raises(ConfigError, match="federate.client_weight"):
        tiny("federate.client_weight", "processed_samples", "federate.method", "hafl")
