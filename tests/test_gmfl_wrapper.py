"""GMFL as a wrapper (issue 15 item 3): bit-identity with the pre-wrapper GMFL, and the wrapper's invariants."""

from __future__ import annotations

import json

import pytest
import torch
from gmfl_golden import CASES, GOLDEN, cpu_capability, fingerprint

from fs_gmfl.core.gmfl.ops import unit_update_l1, update_l1
from fs_gmfl.core.message import Message, Reply
from fs_gmfl.hosts.sim.runner import Simulation

RECORDED = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_wrapper_reproduces_the_pre_wrapper_runs_bit_for_bit(name, tmp_path, single_thread):
    """Final global adapter (SHA-256), every round's loss/accuracy, bytes and frozen fractions: as recorded in
    tests/gmfl_pre_wrapper.json on the commit before GMFL became a wrapper. The adapter's digest is the one the
    pre-wrapper code gave on this CPU capability, or, on a CPU it was not recorded on, one of those recorded."""
    got, want = fingerprint(CASES[name], str(tmp_path)), dict(RECORDED[name])
    digests = want.pop("adapter_sha256")
    assert got.pop("adapter_sha256") in ([digests[cpu_capability()]] if cpu_capability() in digests
                                         else list(digests.values()))
    assert got == want


# -- the unit statistic ---------------------------------------------------------------------------------------------
def test_unit_statistic_is_the_l1_over_the_units_tensors_and_one_tensor_units_match_update_l1():
    """A module unit (A: 6 entries moved by 0.5, B: 4 entries moved by -1) has u = 3 + 4 = 7; relative: divided by
    sum |old| = 6 * 1 + 4 * 2 = 14 -> 0.5. A one-tensor unit is measured exactly like update_l1."""
    old = {"m": (torch.ones(2, 3), torch.full((4, 1), 2.0)), "t": torch.tensor([1.0, -2.0])}
    new = {"m": (torch.full((2, 3), 1.5), torch.ones(4, 1)), "t": torch.tensor([1.25, -1.0])}
    assert unit_update_l1(new, old, ["m", "t"]) == {"m": 7.0, "t": 1.25}
    assert unit_update_l1(new, old, ["m"], normalize="relative") == {"m": 0.5}
    assert unit_update_l1(new, old, ["t"], normalize="relative") == update_l1(new, old, ["t"], normalize="relative")


# -- the compositions in the simulator: invariants --------------------------------------------------------------------
HAFL_TRUNCATION = ["federate.method", "hafl", "hafl.scheme", "truncation",
                   "hafl.profiles", "[{share: 0.5, rank: 1}, {share: 0.25, rank: 2}, {share: 0.25, rank: 4}]"]
HAFL_FREEZING = ["federate.method", "hafl", "hafl.scheme", "freezing",
                 "hafl.profiles", "[{share: 0.5, freeze_ratio: 0.75}, {share: 0.5, freeze_ratio: 0}]"]
FEDHFT = ["federate.method", "fedhft", "fedhft.eval", "global"]
COMPOSITIONS = {"hafl_truncation": HAFL_TRUNCATION, "hafl_freezing": HAFL_FREEZING, "fedhft": FEDHFT}
# tiny_bert: 2 layers x (query, value) = 4 adapted modules; period 1, c = beta = 0.25: ratios 0.5, 0.75, 0.75 (cap
# max_ratio 0.75) -> 2, 3, 3 of the 4 modules frozen after rounds 1, 2, 3.
GMFL_GROWING = ["gmfl.use", "True", "gmfl.period", "1", "gmfl.c", "0.25", "gmfl.beta", "0.25", "gmfl.max_ratio",
                "0.75", "federate.total_round_num", "4"]


def l1_change(before: tuple[torch.Tensor, ...], after: tuple[torch.Tensor, ...]) -> float:
    """Reference statistic: sum over the tensors of sum |after - before|, element by element in float64."""
    return sum(float((a.double() - b.double()).abs().sum()) for a, b in zip(after, before))


def spy_rounds(sim: Simulation) -> list[dict]:
    """Record, around every aggregation: the frozen units, the replies, the unit values and adapter before/after."""
    strategy, log = sim.method.strategy, []
    original = strategy.aggregate

    def aggregate(rnd, replies):
        frozen = set(strategy.masking.frozen)
        before, adapter_before = strategy.base.unit_values(), strategy.global_adapter()
        seen = []  # the replies as they stream past (the simulator passes a one-shot generator)
        report = original(rnd, (seen.append(reply) or reply for reply in replies))
        log.append({"frozen": frozen, "replies": seen, "before": before, "after": strategy.base.unit_values(),
                    "adapter_before": adapter_before, "adapter_after": strategy.global_adapter(),
                    "statistic": dict(strategy.masking.statistic), "accepted": report.accepted})
        return report

    strategy.aggregate = aggregate
    return log


@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_frozen_units_are_whole_never_uploaded_keep_their_value_and_only_grow(name, tiny, single_thread):
    """GMFL + HAFL / FedHFT, period 1: 2, 3, 3 of 4 modules frozen after rounds 1-3 (the hand count above); no reply
    carries any tensor or row encoding of a frozen module; the frozen modules' global values (and for HAFL their
    adapter tensors) keep every bit; frozen sets only grow; each module's statistic is its L1 change."""
    sim = Simulation(tiny(*COMPOSITIONS[name], *GMFL_GROWING, "expname", name), quiet=True)
    sim.setup()
    log = spy_rounds(sim)
    for rnd in range(1, 5):
        sim.run_round(rnd)
    units = sim.method.strategy.units
    assert all(len(keys) == 2 for keys in units.values()) and len(units) == 4  # one unit = one module's A and B
    assert [len(r["frozen"]) for r in log] == [0, 2, 3, 3]
    for earlier, later in zip(log, log[1:]):
        assert earlier["frozen"] <= later["frozen"]
    for rnd in log:
        assert rnd["accepted"] == [reply.client_id for reply in rnd["replies"]]
        frozen_keys = {k for u in rnd["frozen"] for k in units[u]}
        for reply in rnd["replies"]:
            assert not frozen_keys & set(reply.message.tensors)
            assert not any(c.endswith(tuple(rnd["frozen"])) for c in reply.message.control)  # FedHFT row encodings
        for unit in rnd["frozen"]:
            assert all(torch.equal(a, b) for a, b in zip(rnd["after"][unit], rnd["before"][unit]))
            if name.startswith("hafl"):
                assert all(torch.equal(rnd["adapter_after"][k], rnd["adapter_before"][k]) for k in units[unit])
        for unit in units:
            assert rnd["statistic"][unit] == l1_change(rnd["before"][unit], rnd["after"][unit])
    assert any(rnd["statistic"][u] > 0 for rnd in log for u in units)  # the statistic is not trivially zero


@pytest.mark.parametrize("method", ["hafl", "fedhft"])
def test_a_mask_never_cuts_a_module(method, tiny):
    """Freezing a module's A without its B is refused by the base (the unit is the whole module)."""
    overrides = COMPOSITIONS["hafl_freezing" if method == "hafl" else "fedhft"]
    sim = Simulation(tiny(*overrides, "expname", f"cut-{method}"), quiet=True)
    sim.setup()
    a_key = next(k for k in sim.method.strategy.global_adapter() if ".lora_A." in k)
    with pytest.raises(ValueError, match="whole units"):
        sim.method.strategy.set_frozen(frozenset({a_key}))


NEVER_FREEZES = ["gmfl.use", "True", "gmfl.period", "1", "gmfl.c", "0", "gmfl.beta", "0"]
#: every base GMFL wraps, alone: FedIT and FedProx (one tensor per unit) and the module-unit compositions.
BASES = {"fedit": ["federate.method", "fedit"], "fedprox": ["federate.method", "fedprox", "fedprox.mu", "0.1"],
         **COMPOSITIONS}


@pytest.mark.parametrize("name", sorted(BASES))
def test_gmfl_that_never_freezes_is_bit_identical_to_the_base_alone(name, tmp_path, single_thread):
    """c = beta = 0 freezes nothing: the wrapped base gives the same global adapter (SHA-256), the same loss and
    accuracy every round and the same uplink bytes as the base alone; the downlink only adds the 1-byte mask."""
    overrides = [*BASES[name], "federate.total_round_num", "3", "eval.freq", "1"]
    alone = fingerprint(overrides, str(tmp_path / "alone"))
    wrapped = fingerprint([*overrides, *NEVER_FREEZES], str(tmp_path / "wrapped"))
    assert wrapped["adapter_sha256"] == alone["adapter_sha256"]
    for a, w in zip(alone["per_round"], wrapped["per_round"]):
        assert (w.get("test_loss"), w.get("test_acc"), w.get("uplink_bytes")) == \
            (a.get("test_loss"), a.get("test_acc"), a.get("uplink_bytes"))
    mask_bytes = 2 * 2  # 2 clients in rounds 2 and 3 (the first refresh is after round 1), 1 byte each
    assert wrapped["comm"]["downlink_bytes"] == alone["comm"]["downlink_bytes"] + mask_bytes


# -- HAFL and FedHFT strategies with one module frozen: the other modules aggregate exactly as without GMFL -------
def hafl_pair(scheme: str):
    from fs_gmfl.config.fields import make
    from fs_gmfl.core.hafl import HAFLConfig, HAFLStrategy

    g = torch.Generator().manual_seed(0)
    initial = {f"m.l0.{m}.lora_{f}.weight": torch.randn(*shape, generator=g)
               for m in ("q", "v") for f, shape in (("A", (4, 3)), ("B", (2, 4)))}
    return [HAFLStrategy(initial, make(HAFLConfig, "hafl.", scheme=scheme), trained=[2, 4, 1], lr=0.1)
            for _ in range(2)]


@pytest.mark.parametrize("scheme", ["truncation", "freezing"])
def test_hafl_with_a_frozen_module_aggregates_the_other_module_as_hafl_alone(scheme):
    """Module q frozen: the uplinks lose q's factors and index row; v's per-component aggregation is bit-identical
    to HAFL without GMFL on the same uploads, and q keeps every bit."""
    from fs_gmfl.core.hafl import build_uplink
    from fs_gmfl.core.hafl.wire import INDICES

    alone, wrapped = hafl_pair(scheme)
    q = wrapped.pairs[0]
    wrapped.set_frozen(frozenset({q.a_key, q.b_key}))
    clients = [0, 1, 2]
    downs = alone.configure_round(1, clients)
    wrapped.configure_round(1, clients)
    g = torch.Generator().manual_seed(1)
    replies_alone, replies_wrapped = [], []
    for cid in clients:
        factors = {k: v + torch.randn(v.shape, generator=g) for k, v in downs[cid].tensors.items()}
        full = build_uplink(factors, alone.pairs, alone.pending[cid], rank=4, num_samples=10 + cid,
                            truncated=scheme == "truncation")
        replies_alone.append(Reply(cid, full))
        control = {**full.control, INDICES: full.control[INDICES][1:]}
        replies_wrapped.append(Reply(cid, Message({k: v for k, v in full.tensors.items() if ".q." not in k}, control)))
    before = wrapped.global_adapter()
    assert alone.aggregate(1, replies_alone).accepted == clients
    assert wrapped.aggregate(1, replies_wrapped).accepted == clients
    after_alone, after = alone.global_adapter(), wrapped.global_adapter()
    v = wrapped.pairs[1]
    assert torch.equal(after[v.a_key], after_alone[v.a_key]) and torch.equal(after[v.b_key], after_alone[v.b_key])
    assert not torch.equal(after[v.a_key], before[v.a_key])
    assert torch.equal(after[q.a_key], before[q.a_key]) and torch.equal(after[q.b_key], before[q.b_key])
    # an uplink that still carries the frozen module is rejected
    wrapped.configure_round(2, [0])
    assert "indices: shape" in wrapped.aggregate(2, [Reply(0, replies_alone[0].message)]).rejected[0]


# -- fs-gmfl comm: the estimate equals the counted bytes -----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_comm_estimate_equals_the_counted_uplink_of_every_client_and_round(name, tiny, single_thread):
    """Each client's counted uplink = its profile's estimated uplink minus, per frozen module, the estimated saving
    of one module (4 equal modules in tiny_bert, so every module saves the same)."""
    from fs_gmfl.comm_estimate import estimate

    cfg = tiny(*COMPOSITIONS[name], *GMFL_GROWING, "expname", f"comm-{name}")
    profiles = estimate(cfg)["profiles"]
    sim = Simulation(cfg, quiet=True)
    sim.setup()
    log = spy_rounds(sim)
    for rnd in range(1, 5):
        sim.run_round(rnd)
    if name == "fedhft":
        profile_of = {cid: f"level_{level}" for cid, level in enumerate(sim.method.strategy.levels)}
    else:
        profile_of = {cid: row["name"] for row in sim.method.info["profiles"] for cid in row["client_ids"]}
    checked = 0
    for rnd in log:
        for reply in rnd["replies"]:
            profile = profiles[profile_of[reply.client_id]]
            savings = set(profile["gmfl_unit_uplink_bytes"])
            assert len(savings) == 1 and savings.pop() > 0
            expected = profile["uplink"]["bytes"] - len(rnd["frozen"]) * profile["gmfl_unit_uplink_bytes"][0]
            assert reply.message.nbytes == expected
            checked += 1
    assert checked == 8


# -- checkpoints ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hafl_truncation", "fedhft"])
def test_resume_of_a_composition_equals_an_uninterrupted_run(name, tiny, single_thread):
    """GMFL + HAFL / FedHFT: 2 rounds, stop, resume to 4 == 4 rounds straight (adapter bit for bit, masks, bytes)."""
    overrides = [*COMPOSITIONS[name], *GMFL_GROWING, "federate.save_freq", "1"]
    straight = Simulation(tiny(*overrides, "expname", "straight"), quiet=True)
    expected = straight.run()
    Simulation(tiny(*overrides, "expname", "resumed", "federate.total_round_num", "2"), quiet=True).run()
    resumed = Simulation(tiny(*overrides, "expname", "resumed"), quiet=True, resume=True)
    got = resumed.run()
    assert resumed.checkpoint.round == 2
    want, have = straight.method.strategy.global_adapter(), resumed.method.strategy.global_adapter()
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    assert resumed.method.strategy.masking.frozen == straight.method.strategy.masking.frozen
    assert got["comm"] == expected["comm"] and got["final"] == expected["final"]
