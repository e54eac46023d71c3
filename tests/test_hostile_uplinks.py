"""Hostile uplinks against every real strategy: each attack is rejected and leaves the global model bit-identical.

The strategies and the two real uplinks (clients 0 and 1, trained by the simulator) come from
``tests/test_update_validation.py``. The attacks (issue 14): an absurd, non-finite or malformed sample count; the
same client replying twice; a client that was not sampled; every entry at 9,999 (under the per-entry bound of
1e4). For each one the round with the attacker equals the round with the honest reply alone, bit for bit, and
the attacker alone changes nothing. Honest rounds still give the hand-computed (sample-weighted) average.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fs_gmfl.cli import main
from fs_gmfl.core.fedavg import LoraFedAvg
from fs_gmfl.core.message import NUM_SAMPLES, Message, Reply
from fs_gmfl.core.uplinks import (DEFAULT_MAX_SAMPLES, DEFAULT_MAX_UPDATE_RATIO, DEFAULT_UPDATE_RMS_FLOOR, ReplyGate,
                                  ScreenedRound, UplinkPolicy)
from fs_gmfl.hosts.fs import wire
from tests.test_update_validation import BAD, GOOD, METHODS, edited, round_of

pytestmark = pytest.mark.usefixtures("single_thread")

LORA_FEDAVG = ("fedit", "ffa_lora", "gmfl", "fft")


def with_count(value: torch.Tensor | None):
    """Replace (``None``: remove) the sample-count tensor."""
    return lambda m: edited(m, control={NUM_SAMPLES: value})


def every_entry(value: float, *, only_first: bool = False):
    """Every entry of every floating tensor (or of the first one, by key) set to ``value``."""
    def corrupt(message: Message) -> Message:
        keys = sorted(k for k, v in message.tensors.items() if v.is_floating_point() and v.numel())
        return edited(message, tensors={k: torch.full_like(message.tensors[k], value)
                                        for k in (keys[:1] if only_first else keys)})
    return corrupt


#: attack -> (corruption of the attacker's uplink, fragment of the rejection reason).
ATTACKS = {
    "samples_2_pow_40": (with_count(torch.tensor(2**40)), "above its shard size"),
    "samples_nan": (with_count(torch.tensor(float("nan"))), "must be one int64 value"),
    "samples_inf": (with_count(torch.tensor(float("inf"))), "must be one int64 value"),
    "samples_two_elements": (with_count(torch.tensor([30, 30])), "must be one int64 value"),
    "samples_bool": (with_count(torch.tensor(True)), "must be one int64 value"),
    "samples_int32": (with_count(torch.tensor(30, dtype=torch.int32)), "must be one int64 value"),
    "samples_negative": (with_count(torch.tensor(-5)), "not positive"),
    "samples_missing": (with_count(None), "sample count: missing"),
    "every_entry_9999": (every_entry(9999.0), "update norm"),
    "one_tensor_9999": (every_entry(9999.0, only_first=True), "update norm"),
    "every_entry_minus_9999": (every_entry(-9999.0), "update norm"),
}
CASES = [(m, a) for m in METHODS for a in ATTACKS]


def fresh(method: str):
    """A copy of the strategy about to aggregate round 1 (clients 0 and 1 sampled) and the honest replies."""
    strategy, replies = round_of(method)
    return copy.deepcopy(strategy), replies


def assert_same_model(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected), [k for k in expected
                                                                   if not torch.equal(got[k], expected[k])]


def honest_only(method: str) -> dict:
    strategy, replies = fresh(method)
    strategy.aggregate(1, [replies[GOOD]])
    return strategy.global_adapter()


@pytest.mark.parametrize("method,attack", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_attack_is_rejected_and_changes_nothing(method, attack):
    """With the attacker the model equals the honest-only round bit for bit; the attacker alone changes nothing."""
    # Prepare
    corrupt, fragment = ATTACKS[attack]
    mixed, replies = fresh(method)
    alone, _ = fresh(method)
    before = alone.global_adapter()
    bad = Reply(BAD, corrupt(replies[BAD].message))
    # Execute
    mixed_report = mixed.aggregate(1, [replies[GOOD], bad])
    alone_report = alone.aggregate(1, [bad])
    # Assert
    assert mixed_report.accepted == [GOOD] and list(mixed_report.rejected) == [BAD]
    assert fragment in mixed_report.rejected[BAD], mixed_report.rejected[BAD]
    assert alone_report.accepted == [] and list(alone_report.rejected) == [BAD]
    assert_same_model(mixed.global_adapter(), honest_only(method))
    assert_same_model(alone.global_adapter(), before)


@pytest.mark.parametrize("method", METHODS)
def test_a_duplicate_reply_is_rejected_and_the_first_kept(method):
    """The same reply twice, or a second different reply: rejected as a duplicate, the first reply counts once."""
    # Prepare
    once, replies = fresh(method)
    twice, _ = fresh(method)
    changed, _ = fresh(method)
    second = Reply(BAD, every_entry(0.5, only_first=True)(replies[BAD].message))
    # Execute
    once.aggregate(1, replies)
    twice_report = twice.aggregate(1, [replies[GOOD], replies[BAD], replies[BAD]])
    changed_report = changed.aggregate(1, [replies[GOOD], replies[BAD], second])
    # Assert
    for report in (twice_report, changed_report):
        assert report.accepted == [GOOD, BAD] and "duplicate reply" in report.rejected[BAD]
    assert_same_model(twice.global_adapter(), once.global_adapter())
    assert_same_model(changed.global_adapter(), once.global_adapter())


@pytest.mark.parametrize("method", METHODS)
def test_replies_from_clients_not_sampled_are_rejected(method):
    """A client outside the round's sample, or a reply for a round that is not open, changes nothing."""
    # Prepare
    outsider, replies = fresh(method)
    late, _ = fresh(method)
    before = late.global_adapter()
    # Execute
    report = outsider.aggregate(1, [replies[GOOD], Reply(3, replies[BAD].message)])
    late_report = late.aggregate(2, [replies[GOOD]])  # round 2 was never configured
    again = outsider.aggregate(1, [replies[BAD]])  # round 1 is closed once aggregated
    # Assert
    assert report.accepted == [GOOD] and "not sampled" in report.rejected[3]
    assert late_report.accepted == [] and "not sampled" in late_report.rejected[GOOD]
    assert again.accepted == [] and "not sampled" in again.rejected[BAD]
    assert_same_model(outsider.global_adapter(), honest_only(method))
    assert_same_model(late.global_adapter(), before)


@pytest.mark.parametrize("method", LORA_FEDAVG)
def test_honest_round_is_the_hand_computed_sample_weighted_average(method):
    """FedIT, FFA-LoRA, GMFL, FFT: the gate keeps honest replies, and the global is sum(n_i u_i) / sum(n_i)."""
    strategy, replies = fresh(method)
    trainable = strategy.trainable_keys()
    counts = [r.message.num_samples for r in replies]
    report = strategy.aggregate(1, replies)
    assert report.accepted == [GOOD, BAD] and report.rejected == {}
    got = strategy.global_adapter()
    for key in trainable:
        hand = sum(n * r.message.tensors[key].double() for n, r in zip(counts, replies)) / sum(counts)
        torch.testing.assert_close(got[key], hand.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_honest_updates_pass_a_ten_times_tighter_norm_bound_and_aggregate_as_without_any_bound(method):
    """Real first-round updates (LoRA B from 0) are far inside the bound; the gate changes no honest result."""
    tight, replies = fresh(method)
    unbounded, _ = fresh(method)
    tight.policy.max_update_ratio = DEFAULT_MAX_UPDATE_RATIO / 10
    unbounded.policy.max_update_ratio = 0.0
    unbounded.policy.shard_sizes = {}
    assert tight.aggregate(1, replies).accepted == [GOOD, BAD]
    assert unbounded.aggregate(1, replies).accepted == [GOOD, BAD]
    assert_same_model(tight.global_adapter(), unbounded.global_adapter())


@pytest.mark.parametrize("method", METHODS)
def test_the_configured_sample_bound_applies_where_shards_are_unknown(method):
    """Without shard sizes (FederatedScope host) ``federate.max_sample_count`` bounds the count, inclusively."""
    strategy, replies = fresh(method)
    strategy.policy.shard_sizes = {}
    strategy.policy.max_samples = 1000
    over = Reply(BAD, with_count(torch.tensor(1001))(replies[BAD].message))
    at = Reply(GOOD, with_count(torch.tensor(1000))(replies[GOOD].message))
    report = strategy.aggregate(1, [at, over])
    assert report.accepted == [GOOD] and "above federate.max_sample_count 1000" in report.rejected[BAD]


@pytest.mark.parametrize("method", METHODS)
def test_the_wire_dtype_is_set_in_one_place(method):
    """``policy.wire_dtype`` = bf16: float32 uploads are rejected, bf16 ones accepted; the global stays float32."""
    strategy, replies = fresh(method)
    strategy.policy.wire_dtype = torch.bfloat16
    as_bf16 = Reply(GOOD, edited(replies[GOOD].message, tensors={
        k: v.to(torch.bfloat16) for k, v in replies[GOOD].message.tensors.items() if v.is_floating_point()}))
    report = strategy.aggregate(1, [as_bf16, replies[BAD]])
    assert report.accepted == [GOOD] and "expected torch.bfloat16" in report.rejected[BAD]
    assert all(v.dtype == torch.float32 for v in strategy.global_adapter().values() if v.is_floating_point())


def test_the_update_bound_rule_and_its_floor():
    """bound = ratio * max(||g||, floor * sqrt(n)): relative for large tensors, the floor when g = 0."""
    policy = UplinkPolicy(max_update_ratio=10.0, update_rms_floor=1.0)
    assert policy.update_bound(0.0, 4) == 20.0  # B = 0: 10 * 1 * sqrt(4)
    assert policy.update_bound(100.0, 4) == 1000.0
    zeros = torch.zeros(2, 2)
    assert policy.check_delta("b", torch.full((2, 2), 10.0), zeros) is None  # ||delta|| = 20 = bound
    assert "update norm" in policy.check_delta("b", torch.full((2, 2), 10.001), zeros)
    assert UplinkPolicy(max_update_ratio=0.0).check_delta("b", torch.full((2, 2), 9999.0), zeros) is None
    assert (DEFAULT_MAX_SAMPLES, DEFAULT_UPDATE_RMS_FLOOR) == (1_000_000, 1.0)


def test_screening_judges_in_order_and_closes_the_round():
    """Not sampled before duplicate before sample count before the strategy's check; the round closes after;
    only accepted replies reach the fold."""

    class Recorder:
        gate, policy, folded = ReplyGate(), UplinkPolicy(), []

        def check_reply(self, reply):
            return "never called twice"

        def begin_fold(self, rnd):
            pass

        def fold_reply(self, reply, parsed):
            self.folded.append(reply.client_id)

        def end_fold(self, rnd, report):
            pass

    strategy = Recorder()
    strategy.gate.open(4, [0, 1])
    ok = Message(control={NUM_SAMPLES: torch.tensor(3)})
    round_ = ScreenedRound(strategy, 4)
    for reply in [Reply(0, ok), Reply(0, ok), Reply(2, ok), Reply(1, Message())]:
        round_.add(reply)
    report = round_.finish()
    assert report.accepted == [] and report.rejected[0] == "never called twice"
    assert report.rejected[2].startswith("not sampled") and report.rejected[1].startswith("sample count: missing")
    assert strategy.gate.round is None and strategy.folded == []


def test_strategy_used_directly_must_open_the_round():
    """A strategy that never configured a round accepts nothing (no implicit trust)."""
    strategy = LoraFedAvg({"m.lora_A.weight": torch.zeros(2, 2)})
    reply = Reply(0, Message({"m.lora_A.weight": torch.ones(2, 2)}, {NUM_SAMPLES: torch.tensor(1)}))
    assert "not sampled" in strategy.aggregate(1, [reply]).rejected[0]
    strategy.configure_round(1, [0])
    assert strategy.aggregate(1, [reply]).accepted == [0]


# -- the gRPC decoder ------------------------------------------------------------------------------------------
def encoded_count(value: torch.Tensor) -> dict[str, str]:
    return wire.encode(Message({"a": torch.ones(2)}, {NUM_SAMPLES: value}), wire.UPLINK)


@pytest.mark.parametrize("count,match", [
    (torch.tensor(float("nan")), "has dtype float32, expected int64"),
    (torch.tensor([30, 30]), r"has shape \[2\], expected \[\]"),
    (torch.tensor(True), "has dtype bool, expected int64"),
    (torch.tensor([7]), r"has shape \[1\], expected \[\]"),
])
def test_wire_decoder_refuses_a_malformed_sample_count_from_its_header(count, match):
    """The decoder checks the count's dtype and shape from the header, before building a tensor."""
    with pytest.raises(wire.WireError, match=match):
        wire.decode(encoded_count(count), expect=wire.UPLINK)
    assert wire.decode(encoded_count(torch.tensor(30)), expect=wire.UPLINK).num_samples == 30


@pytest.mark.parametrize("text,match", [
    ("bool|2|AAI=", "bytes other than 0 and 1"),
    ("float32|2|" + "A" * 4000, "more than shape"),
    ("float32|0,4294967296|", "invalid shape"),
    ("float32|1,1,1,1,1,1,1,1,1|AAAAAA==", "invalid shape"),
])
def test_wire_decoder_refuses_bad_bools_oversized_payloads_and_shapes(text, match):
    """Invalid bool bytes, base64 longer than the header's shape needs, a huge dimension, too many dimensions."""
    with pytest.raises(wire.WireError, match=match):
        wire.decode_tensor(text, name="t/x")


@pytest.mark.parametrize("key,value,allowed", [
    ("federate.max_sample_count", "0", "[1, inf)"),
    ("federate.max_update_ratio", "-1", "[0.0, inf)"),
    ("federate.update_rms_floor", "0", "(0.0, inf)"),
])
def test_bad_uplink_bound_keys_exit_2_with_one_line(key, value, allowed, tmp_path, capsys):
    """The three new keys are range-checked like every other: one line naming the key, exit 2."""
    code = main(["run", "--cfg", "/dev/null", "--quiet", "outdir", str(tmp_path), key, value])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and f"'{key}'" in lines[0] and allowed in lines[0]


def test_a_hostile_client_in_a_real_run_is_rejected_every_round_and_counted(tiny):
    """Client uplinks inflated to 9,999 per entry (odd calls) or claiming 2^40 samples (every fourth call from the
    second) are rejected each time with their reason, counted in summary.json; the run ends normally."""
    from fs_gmfl.hosts.sim.runner import Simulation

    cfg = tiny()
    sim = Simulation(cfg, quiet=True)
    setup = sim.setup

    def hostile_setup() -> None:
        setup()
        finish = sim.method.client.finish
        calls = iter(range(10**6))

        def hostile(plan, stats, state):
            message, call = finish(plan, stats, state), next(calls)
            if call % 2 == 0:
                return every_entry(9999.0)(message)
            return with_count(torch.tensor(2**40))(message) if call % 4 == 1 else message

        sim.method.client.finish = hostile

    sim.setup = hostile_setup
    summary = sim.run()
    rounds = cfg.federate.total_round_num
    assert [r["rejected"] for r in summary["per_round"][1:]] == [2, 1] * (rounds // 2)
    assert summary["rejected_updates"]["by_reason"] == {"update norm": rounds, "sample count": rounds // 2}
