"""GMFL over LoRA-A2 (``federate.method: lora_a2`` + ``gmfl.use: True``, spec GMFL.md section 7.4, ``lora_a2gm``):
after every round the factor it trained is re-masked (rho_A = c + floor(t / period) * beta, rho_B =
``gmfl.a2_ratio_B``); masks by hand, uplinks, bytes, the never-freezing case, resume and the configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fs_gmfl.comm_estimate import estimate
from fs_gmfl.config.advice import config_warnings
from fs_gmfl.core.gmfl.config import GMFLConfig
from fs_gmfl.core.gmfl.wire import MASK
from fs_gmfl.core.gmfl.wrapper import GMFLStrategy
from fs_gmfl.core.lora_a2.masking import AlternatingMasking, remask_ratio
from fs_gmfl.core.lora_a2.strategy import LoraA2FedAvg
from fs_gmfl.core.message import Message, Reply, samples_tensor, unpack_bits
from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.sim.runner import Simulation

pytestmark = pytest.mark.usefixtures("single_thread")

# -- masks by hand on a hand-made adapter: 4 modules m0..m3, each lora_A (1x2) and lora_B (2x1), and a head ---------
MODULES = range(4)
A = [f"m{i}.lora_A.default.weight" for i in MODULES]
B = [f"m{i}.lora_B.default.weight" for i in MODULES]
HEAD = "head.weight"
# c = beta = 0.25, period 2, rho_B = 0.5: rho_A after round 2 = 0.25 + 1 * 0.25 = 0.5, after round 4 = 0.25 + 2 * 0.25
CONFIG = GMFLConfig(use=True, c=0.25, beta=0.25, period=2, a2_ratio_B=0.5)
# the L1 norm of each tensor's global update per round (dyadic, so exact in float32); only trained tensors move.
# Round 1 (B): sorted .125 .25 .375 .5, k = floor(.5 * 4) = 2, tau = .375: B1, B3 frozen.
# Round 2 (A): sorted .0625 .25 .375 .5, k = 2, tau = .375: A0, A2 frozen.
# Round 3 (B, only B0 and B2 train): u = .0625, 0, .75, 0; tau = s[2] = .0625: B1, B3 frozen again (B0, tiny, is not).
# Round 4 (A, only A1 and A3 train): u = 0, .5, 0, .125; rho_A = .75, k = 3, tau = .5: A0, A2, A3 frozen.
DELTAS = {1: {B[0]: 0.5, B[1]: 0.125, B[2]: 0.375, B[3]: 0.25},
          2: {A[0]: 0.0625, A[1]: 0.5, A[2]: 0.25, A[3]: 0.375},
          3: {B[0]: 0.0625, B[2]: 0.75},
          4: {A[1]: 0.5, A[3]: 0.125}}
FROZEN_AFTER = {1: {B[1], B[3]}, 2: {A[0], A[2], B[1], B[3]}, 3: {A[0], A[2], B[1], B[3]},
                4: {A[0], A[2], A[3], B[1], B[3]}}
UPLOADED = {1: [*B, HEAD], 2: [*A, HEAD], 3: [B[0], B[2], HEAD], 4: [A[1], A[3], HEAD]}


def hand_adapter() -> dict[str, torch.Tensor]:
    """Every LoRA tensor and the head filled with ones."""
    shapes = {**{k: (1, 2) for k in A}, **{k: (2, 1) for k in B}, HEAD: (2,)}
    return {k: torch.ones(shape) for k, shape in shapes.items()}


def hand_strategy(config: GMFLConfig = CONFIG) -> GMFLStrategy:
    base = LoraA2FedAvg(hand_adapter())
    return GMFLStrategy(base, AlternatingMasking(config, list(base.mask_units())))


def upload(strategy: GMFLStrategy, keys: list[str], deltas: dict[str, float]) -> Message:
    """The global values of ``keys``, each LoRA tensor moved by ``deltas[key] / 2`` per entry (L1 change ``deltas``)."""
    tensors = {}
    for key in keys:
        value = strategy.global_state[key].clone()
        tensors[key] = value + deltas.get(key, 0.0) / value.numel()
    return Message(tensors, {"num_samples": samples_tensor(4)})


def test_masks_of_rounds_one_to_four_by_hand():
    """One client per round (its upload becomes the global value), the deltas above: after each round exactly the
    hand-computed tensors are frozen; the downlink's packed mask says so (bit = trainable, unit order A0 B0 A1 B1
    ...); the server expects exactly the round's factor minus its frozen tensors, and the head."""
    strategy = hand_strategy()
    units = list(strategy.units)
    frozen: set[str] = set()
    for rnd in range(1, 5):
        down = strategy.configure_round(rnd, [0])[0]
        if rnd == 1:
            assert MASK not in down.control  # nothing re-masked yet
        else:
            flags = unpack_bits(down.control[MASK], len(units)).tolist()
            assert {u for u, trainable in zip(units, flags) if not trainable} == frozen
        assert sorted(strategy.trainable_keys()) == sorted(UPLOADED[rnd])
        report = strategy.aggregate(rnd, [Reply(0, upload(strategy, UPLOADED[rnd], DELTAS[rnd]))])
        assert report.accepted == [0]
        frozen = set(strategy.masking.frozen)
        assert frozen == FROZEN_AFTER[rnd], rnd
    assert strategy.masking.ratios == {"lora_A": 0.75, "lora_B": 0.5}


def test_an_uplink_carrying_a_masked_tensor_is_rejected_and_changes_nothing():
    """Round 3 trains lora_B, but B1 and B3 are masked: an upload that also carries B1 is rejected, the global adapter
    is unchanged and, with no accepted update, the masks are kept (nothing re-masked)."""
    strategy = hand_strategy()
    for rnd in (1, 2):
        strategy.configure_round(rnd, [0])
        strategy.aggregate(rnd, [Reply(0, upload(strategy, UPLOADED[rnd], DELTAS[rnd]))])
    before, version = strategy.global_adapter(), strategy.masking.version
    strategy.configure_round(3, [0])
    report = strategy.aggregate(3, [Reply(0, upload(strategy, [*UPLOADED[3], B[1]], DELTAS[3]))])
    assert report.accepted == [] and strategy.masking.frozen == FROZEN_AFTER[2]
    assert strategy.masking.version == version
    assert all(torch.equal(v, before[k]) for k, v in strategy.global_adapter().items())


def test_a_re_mask_replaces_the_factors_mask():
    """The re-mask recomputes the trained factor's mask (spec 4: M <- freeze_smallest(u, rho)); the frozen set grows
    only because frozen tensors have Delta = 0. If the trained tensors do not move at all, u is 0 everywhere, tau = 0
    and (strict) nothing is below it: the lora_B mask is cleared, the lora_A mask is untouched."""
    strategy = hand_strategy()
    for rnd in (1, 2, 3, 4):
        strategy.configure_round(rnd, [0])
        strategy.aggregate(rnd, [Reply(0, upload(strategy, UPLOADED[rnd], DELTAS[rnd]))])
    strategy.configure_round(5, [0])
    report = strategy.aggregate(5, [Reply(0, upload(strategy, UPLOADED[3], {}))])
    assert report.accepted == [0]
    assert strategy.masking.frozen == {A[0], A[2], A[3]}


@pytest.mark.parametrize(("rnd", "ratio"), [(1, 0.8), (2, 0.1), (18, 0.1), (19, 0.8), (20, 0.15), (38, 0.15),
                                            (40, 0.2), (400, 0.95)])
def test_remask_ratio_with_the_default_configuration(rnd, ratio):
    """Defaults c 0.1, beta 0.05, period 20, a2_ratio_B 0.8, max_ratio 0.95: lora_B rounds 0.8; lora_A round t:
    0.1 + floor(t / 20) * 0.05 (the code's c + floor((r + 1) / 20) * beta, r = t - 1), capped at 0.95."""
    assert remask_ratio(rnd, GMFLConfig(use=True)) == pytest.approx(ratio)


# -- in the simulator ---------------------------------------------------------------------------------------------
LORA_A2 = ["federate.method", "lora_a2"]
GMFL = ["gmfl.use", "True", "gmfl.c", "0.25", "gmfl.beta", "0.25", "gmfl.period", "2", "gmfl.a2_ratio_B", "0.5"]


def test_no_uplink_carries_a_masked_tensor_and_bytes_per_round_match_the_hand_count(tiny):
    """tiny_bert (4 LoRA modules, each factor 64 float32 = 256 B; head 136 B), 2 clients a round, the GMFL keys
    above: round 1 trains the 4 lora_B, round 2 the 4 lora_A; after round 1 two lora_B are masked (rho_B 0.5),
    after round 2 two lora_A (rho_A 0.5), so rounds 3 and 4 upload 2 factors. Per client, uplink
    4 x 256 + 136 + 8 = 1168 B (rounds 1, 2) and 2 x 256 + 136 + 8 = 656 B (3, 4); downlink 8 x 256 + 136 + 1
    (parity) = 2185 B, plus the 1-byte mask (8 units) from round 2 on. No reply carries a masked or idle tensor,
    and ``fs-gmfl comm`` gives the same uplinks per round."""
    sim = Simulation(tiny(*LORA_A2, *GMFL), quiet=True)
    sim.setup()
    strategy, seen = sim.method.strategy, []
    original = strategy.aggregate

    def aggregate(rnd, replies):
        frozen = set(strategy.masking.frozen)
        report = original(rnd, (seen.append((rnd, frozen, set(r.message.tensors))) or r for r in replies))
        assert len(report.accepted) == 2
        return report

    strategy.aggregate = aggregate
    rows = [sim.run_round(rnd) for rnd in range(1, 5)]
    idle = {1: "lora_A", 2: "lora_B", 3: "lora_A", 4: "lora_B"}
    assert len(seen) == 8
    for rnd, frozen, keys in seen:
        assert not keys & frozen and not any(f".{idle[rnd]}." in k for k in keys)
        assert len([k for k in keys if ".lora_" in k]) == (4 if rnd <= 2 else 2)
    up = [2 * 1168, 2 * 1168, 2 * 656, 2 * 656]
    assert [r["uplink_bytes"] for r in rows] == up
    assert [r["downlink_bytes"] for r in rows] == [2 * 2185, 2 * 2186, 2 * 2186, 2 * 2186]
    assert [r["frozen_fraction"] for r in rows] == [0.0, 2 / 8, 4 / 8, 4 / 8]
    schedule = estimate(sim.cfg)["gmfl"]["schedule"]
    by_round = {rnd: b for b in schedule for rnd in range(b["first_round"], b["last_round"] + 1, 2)}
    assert [2 * by_round[rnd]["uplink_bytes_max"] for rnd in range(1, 5)] == up
    assert [2 * by_round[rnd]["uplink_bytes_min"] for rnd in range(1, 5)] == up


def run_summary(sim: Simulation) -> tuple[dict, dict[str, torch.Tensor]]:
    return sim.run(), sim.method.strategy.global_adapter()


def test_gmfl_that_never_freezes_is_lora_a2_bit_for_bit(tiny):
    """c = beta = 0 and a2_ratio_B = 0: floor(0 * n) = 0, nothing is ever frozen, and the run is lora_a2's: the same
    global adapter bit for bit, the same losses, accuracies and uplinks in every round; the downlink carries the
    1-byte mask from round 2 on (2 clients: 2 B more per round)."""
    never = ["gmfl.use", "True", "gmfl.c", "0", "gmfl.beta", "0", "gmfl.a2_ratio_B", "0", "gmfl.period", "1"]
    plain, plain_adapter = run_summary(Simulation(tiny(*LORA_A2, "expname", "plain"), quiet=True))
    masked, masked_adapter = run_summary(Simulation(tiny(*LORA_A2, *never, "expname", "gm"), quiet=True))
    assert plain_adapter.keys() == masked_adapter.keys()
    assert all(torch.equal(plain_adapter[k], masked_adapter[k]) for k in plain_adapter)
    for p, m in zip(plain["per_round"], masked["per_round"]):
        assert m.get("frozen_fraction", 0.0) == 0.0
        for key in ("uplink_bytes", "train_loss", "val_loss", "val_acc", "test_acc", "clients"):
            assert p.get(key) == m.get(key), key
    assert [m["downlink_bytes"] - p["downlink_bytes"] for p, m in zip(plain["per_round"][1:],
                                                                       masked["per_round"][1:])] == [0, 2, 2, 2]


def test_resume_from_round_2_equals_an_uninterrupted_run(tiny):
    """2 rounds, stop, resume to 4 == 4 rounds straight (the masks, each factor's ratio and the last round are in the
    checkpoint): the same global adapter bit for bit, the same per-round records and the same final masks."""
    overrides = [*LORA_A2, *GMFL, "gmfl.period", "1", "federate.save_freq", "1"]
    straight = Simulation(tiny(*overrides, "expname", "straight"), quiet=True)
    expected = straight.run()
    Simulation(tiny(*overrides, "expname", "resumed", "federate.total_round_num", "2"), quiet=True).run()
    resumed = Simulation(tiny(*overrides, "expname", "resumed"), quiet=True, resume=True)
    got = resumed.run()
    timing = {"median_step_seconds", "train_seconds", "eval_seconds"}
    assert ([{k: v for k, v in r.items() if k not in timing} for r in got["per_round"]]
            == [{k: v for k, v in r.items() if k not in timing} for r in expected["per_round"]])
    want, have = straight.method.strategy.global_adapter(), resumed.method.strategy.global_adapter()
    assert all(torch.equal(want[k], have[k]) for k in want)
    assert resumed.method.strategy.masking.state_dict()["frozen_flags"] == \
        straight.method.strategy.masking.state_dict()["frozen_flags"]
    assert resumed.method.strategy.masking.ratios == straight.method.strategy.masking.ratios
    assert any(straight.method.strategy.masking.state_dict()["frozen_flags"])
    assert (Path(resumed.run_dir) / "comm_log.jsonl").read_text() == (Path(straight.run_dir) / "comm_log.jsonl"
                                                                       ).read_text()
    assert json.dumps(got["comm"]) == json.dumps(expected["comm"])


# -- configuration ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "message"), [(".nan", "finite"), (".inf", "finite"), ("-.inf", "finite"),
                                                ("-0.1", "[0.0, 1.0]"), ("1.5", "[0.0, 1.0]"),
                                                ("abc", "expected a number"), ("nan", "expected a number")])
def test_a2_ratio_b_out_of_range_or_not_a_number_is_one_line_naming_the_key(tiny, value, message):
    """YAML NaN and infinities, a negative value, one above 1 and strings: one line naming the key, the value and
    what is allowed."""
    with pytest.raises(ConfigError) as err:
        tiny(*LORA_A2, "gmfl.use", "True", "gmfl.a2_ratio_B", value)
    text = str(err.value)
    assert "gmfl.a2_ratio_B" in text and message in text and "\n" not in text


@pytest.mark.parametrize("value", ["0", "1", "0.8"])
def test_a2_ratio_b_in_zero_to_one_is_accepted_and_capped_by_max_ratio(tiny, value):
    """0 (never freeze lora_B) and 1 are allowed; the ratio used is min(a2_ratio_B, gmfl.max_ratio)."""
    cfg = tiny(*LORA_A2, "gmfl.use", "True", "gmfl.a2_ratio_B", value)
    assert cfg.gmfl.a2_ratio_B == float(value)
    assert remask_ratio(1, cfg.gmfl) == min(float(value), cfg.gmfl.max_ratio)


def test_other_statistics_and_stateful_sync_are_refused_with_lora_a2(tiny):
    """The masks are recomputed from each round's update, so gmfl.stat must be last_round_l1; lora_a2's downlink is
    rebuilt every round (its parity), so gmfl.downlink stateful_sync is refused as for other such bases."""
    with pytest.raises(ConfigError, match="gmfl.stat.*'last_round_l1' with federate.method 'lora_a2'"):
        tiny(*LORA_A2, "gmfl.use", "True", "gmfl.stat", "ema_l1")
    with pytest.raises(ConfigError, match="gmfl.downlink"):
        tiny(*LORA_A2, "gmfl.use", "True", "gmfl.downlink", "stateful_sync")


def test_no_idle_period_warning_with_lora_a2(tiny):
    """gmfl.period not below the round count idles plain GMFL (warned), but lora_a2 re-masks after every round."""
    assert config_warnings(tiny("gmfl.use", "True", "gmfl.period", "20"))
    assert not config_warnings(tiny(*LORA_A2, "gmfl.use", "True", "gmfl.period", "20"))


def test_estimate_schedule_with_the_default_ratios(tiny):
    """200 rounds, defaults: lora_B rounds 3, 5, ... freeze floor(0.8 * 4) = 3 of 4; lora_A rounds t >= 4 use
    rho_A(t - 2): 0.1 (floor(0.4) = 0 frozen) until round 21, 0.15 (0) ... 0.25 (1) from round 62 on."""
    cfg = tiny(*LORA_A2, "gmfl.use", "True", "federate.total_round_num", "200")
    schedule = estimate(cfg)["gmfl"]["schedule"]
    b_rounds = [s for s in schedule if s["trains"] == "lora_B"]
    assert [(s["first_round"], s["last_round"], s["frozen"]) for s in b_rounds] == [(1, 1, 0), (3, 199, 3)]
    a_first_frozen = min(s["first_round"] for s in schedule if s["trains"] == "lora_A" and s["frozen"] == 1)
    assert a_first_frozen == 62 and math.floor((0.1 + (60 // 20) * 0.05) * 4 + 1e-9) == 1
