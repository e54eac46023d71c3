"""Client failures in the embedded simulator: dropout before/after training, stragglers past a deadline.

The round aggregates exactly the replies that arrived in time; a round without any leaves the global model
bit-identical and is reported; components nobody trained keep their value; the counts in summary.json are those
of the seeded draw.
"""

from __future__ import annotations

import json

import pytest
import torch
from method_cases import registered_cases  # noqa: E402

from fs_gmfl.config import load_config
from fs_gmfl.config.faults import FaultsConfig
from fs_gmfl.core.adapter import LORA_A, LORA_B, kind_of
from fs_gmfl.core.message import Reply
from fs_gmfl.hosts.common.batches import sample_clients
from fs_gmfl.hosts.sim.faults import DROPPED_AFTER, DROPPED_BEFORE, LATE, ON_TIME, client_fate, round_fates
from fs_gmfl.hosts.sim.runner import Simulation

pytestmark = pytest.mark.usefixtures("single_thread")

FAULTS = ["faults.dropout_before", "0.4", "faults.dropout_after", "0.2", "faults.straggler_fraction", "0.5",
          "faults.straggler_delay", "2", "faults.deadline", "2"]
METHODS = registered_cases(
    adjust={"fedkrso": ["fedkrso.interval", "2"]},
    variants={
        "gmfl": ["gmfl.use", "True", "gmfl.c", "0.5", "gmfl.period", "1"],
        "gmfl_stateful": ["gmfl.use", "True", "gmfl.c", "0.5", "gmfl.period", "1", "gmfl.downlink", "stateful_sync"],
    })


def draws(cfg, seed: int) -> dict[int, dict[int, tuple[str, float]]]:
    """The seeded fates of every round's sampled clients, as the simulator will draw them."""
    fed = cfg.federate
    return {rnd: round_fates(cfg.faults, sample_clients(fed.client_num, fed.clients_per_round(), seed=seed, rnd=rnd),
                             seed=seed, rnd=rnd)
            for rnd in range(1, fed.total_round_num + 1)}


def on_time(fates: dict[int, tuple[str, float]]) -> list[int]:
    return sorted(c for c, (fate, _) in fates.items() if fate == ON_TIME)


def seed_where(cfg, predicate) -> int:
    """The first run seed whose fault draw satisfies ``predicate`` (so each test sees the case it is about)."""
    seed = next((s for s in range(200) if predicate(draws(cfg, s))), None)
    assert seed is not None, "no seed in [0, 200) gives the wanted draw"
    return seed


def empty_then_busy(d) -> bool:
    """A round without replies early on, and a later round with some."""
    rounds = sorted(d)
    return any(not on_time(d[r]) and any(on_time(d[q]) for q in rounds if q > r) for r in rounds[:-1])


def recording(sim: Simulation) -> list[dict]:
    """Wrap the strategy's aggregate (after set-up) to record its input and the global adapter around it."""
    calls: list[dict] = []
    setup = sim.setup

    def setup_and_wrap() -> None:
        setup()
        strategy = sim.method.strategy
        aggregate = strategy.aggregate

        def wrapped(rnd, replies):
            masking = getattr(strategy, "masking", None)
            frozen = set(masking.frozen) if masking is not None else set()
            before = strategy.global_adapter()
            clients: list[int] = []  # replies arrive as a one-shot stream: record them as they pass
            report = aggregate(rnd, (clients.append(r.client_id) or r for r in replies))
            calls.append({"round": rnd, "clients": clients, "before": before,
                          "after": strategy.global_adapter(), "frozen": frozen, "report": report})
            return report

        strategy.aggregate = wrapped

    sim.setup = setup_and_wrap
    return calls


def changed_keys(before, after) -> set[str]:
    assert set(before) == set(after)
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("method", list(METHODS))
def test_failures_aggregate_only_arrived_replies_and_empty_rounds_change_nothing(tiny, tmp_path, method):
    """Per method: aggregate sees exactly the on-time replies; a round with none leaves the global model unchanged."""
    # Prepare
    probe = tiny(*METHODS[method], *FAULTS)
    seed = seed_where(probe, empty_then_busy)
    cfg = tiny(*METHODS[method], *FAULTS, "seed", str(seed), "expname", method)
    expected = draws(cfg, seed)
    sim = Simulation(cfg, quiet=True)
    calls = recording(sim)
    # Execute
    summary = sim.run()
    # Assert
    assert [c["round"] for c in calls] == sorted(expected)
    for call in calls:
        fates = expected[call["round"]]
        assert call["clients"] == on_time(fates)
        assert call["report"].rejected == {}
        changed = changed_keys(call["before"], call["after"])
        if not call["clients"]:
            assert changed == set(), f"round {call['round']} had no replies but changed {sorted(changed)[:3]}"
        else:
            assert changed, f"round {call['round']} aggregated {call['clients']} but changed nothing"
        assert not changed & call["frozen"]  # GMFL: frozen tensors nobody trained keep their value
    empty = [r for r, f in expected.items() if not on_time(f)]
    assert empty and summary["faults"]["rounds_without_replies"] == empty
    assert all(summary["final"][k] == summary["final"][k] for k in summary["final"])  # evaluated, no NaN


def test_summary_and_comm_log_match_the_seeded_draw(tiny, tmp_path):
    """Per round: replies, dropped_before/after and late as drawn; uplinks counted only for clients that sent."""
    # Prepare
    probe = tiny(*FAULTS, "federate.total_round_num", "6")
    seed = seed_where(probe, lambda d: {f for fates in d.values() for f, _ in fates.values()} ==
                      {ON_TIME, DROPPED_BEFORE, DROPPED_AFTER, LATE})
    cfg = tiny(*FAULTS, "federate.total_round_num", "6", "seed", str(seed))
    expected = draws(cfg, seed)
    # Execute
    summary = Simulation(cfg, quiet=True).run()
    # Assert
    transfers = [json.loads(line) for line in (tmp_path / cfg.run_name / "comm_log.jsonl").read_text().splitlines()]
    totals = {DROPPED_BEFORE: 0, DROPPED_AFTER: 0, LATE: 0}
    for row in summary["per_round"][1:]:
        fates = expected[row["round"]]
        count = {fate: sum(1 for f, _ in fates.values() if f == fate) for fate in (*totals, ON_TIME)}
        assert (row["replies"], row["dropped_before"], row["dropped_after"], row["late"]) == (
            count[ON_TIME], count[DROPPED_BEFORE], count[DROPPED_AFTER], count[LATE])
        for fate in totals:
            totals[fate] += count[fate]
        sent = sorted(c for c, (f, _) in fates.items() if f in (ON_TIME, LATE))
        logged = [t for t in transfers if t["round"] == row["round"]]
        assert sorted(t["client"] for t in logged if t["direction"] == "uplink") == sent
        assert sorted(t["client"] for t in logged if t["direction"] == "downlink") == row["clients"]
        missed = count[ON_TIME] < len(fates)
        assert row["round_seconds"] == (2.0 if missed else max(s for _, s in fates.values()))
    assert {k: summary["faults"][k] for k in totals} == totals
    assert min(totals.values()) >= 1


def test_no_faults_configured_changes_nothing(tiny):
    """Default faults: every sampled client replies, and no fault columns appear."""
    summary = Simulation(tiny(), quiet=True).run()
    rows = summary["per_round"][1:]
    assert [r["replies"] for r in rows] == [2] * 4
    assert all("dropped_before" not in r for r in rows)
    assert summary["faults"] == {DROPPED_BEFORE: 0, DROPPED_AFTER: 0, LATE: 0, "rounds_without_replies": []}


def test_hafl_components_nobody_trained_keep_their_value(tiny):
    """HAFL truncation: when only rank-1 clients reply, at most one rank-1 component per module changes."""
    # Prepare
    profiles = ["federate.method", "hafl", "hafl.scheme", "truncation",
                "hafl.profiles", "[{clients: [0, 1], rank: 1}, {clients: [2, 3], rank: 4}]"]
    probe = tiny(*profiles, *FAULTS)
    seed = seed_where(probe, lambda d: any(on_time(f) and set(on_time(f)) <= {0, 1} for f in d.values()))
    cfg = tiny(*profiles, *FAULTS, "seed", str(seed))
    sim = Simulation(cfg, quiet=True)
    calls = recording(sim)
    # Execute
    sim.run()
    # Assert
    low_rank_rounds = [c for c in calls if c["clients"] and set(c["clients"]) <= {0, 1}]
    assert low_rank_rounds
    for call in low_rank_rounds:
        changed_components = 0
        for key, old in call["before"].items():
            new = call["after"][key]
            if kind_of(key) == LORA_A:
                rows = {i for i in range(old.shape[0]) if not torch.equal(old[i], new[i])}
                cols = {i for i in range(old.shape[0])
                        if not torch.equal(call["before"][key.replace("lora_A", "lora_B")][:, i],
                                           call["after"][key.replace("lora_A", "lora_B")][:, i])}
                assert len(rows) <= 1 and cols <= rows, (key, rows, cols)
                changed_components += len(rows)
            elif kind_of(key) != LORA_B:
                assert torch.equal(old, new)  # head not trained (hafl.train_head False)
        assert changed_components >= 1


def test_fate_draw_is_per_client_and_independent_of_the_other_probabilities():
    """The drop-before set does not move when dropout_after or stragglers change; p = 0 and p = 1 are exact."""
    base = FaultsConfig(dropout_before=0.3)
    other = FaultsConfig(dropout_before=0.3, dropout_after=0.5, straggler_fraction=0.5, straggler_delay=1.0)
    pairs = [(r, c) for r in range(1, 51) for c in range(40)]

    def dropped(cfg):
        return {p for p in pairs if client_fate(cfg, seed=7, rnd=p[0], client_id=p[1])[0] == DROPPED_BEFORE}

    first = dropped(base)
    assert first == dropped(other)
    assert abs(len(first) / len(pairs) - 0.3) < 0.03  # 2,000 Bernoulli(0.3) draws: sd 0.010
    assert dropped(FaultsConfig()) == set()
    assert dropped(FaultsConfig(dropout_before=1.0)) == set(pairs)


def test_stragglers_are_late_exactly_when_past_the_deadline():
    """Straggler time = client_seconds + U[0, delay); late iff it exceeds the deadline (half of them here)."""
    cfg = FaultsConfig(straggler_fraction=1.0, straggler_delay=2.0, client_seconds=1.0, deadline=2.0)
    fates = [client_fate(cfg, seed=3, rnd=r, client_id=c) for r in range(1, 41) for c in range(50)]
    assert all(1.0 <= s < 3.0 for _, s in fates)
    assert all((f == LATE) == (s > 2.0) for f, s in fates)
    assert abs(sum(f == LATE for f, _ in fates) / len(fates) - 0.5) < 0.04
    no_deadline = FaultsConfig(straggler_fraction=1.0, straggler_delay=2.0)
    assert {client_fate(no_deadline, seed=3, rnd=1, client_id=c)[0] for c in range(50)} == {ON_TIME}


def test_faults_keys_load_from_yaml_overrides():
    """faults.* are ordinary config keys with their defaults."""
    cfg = load_config(None, ["faults.dropout_before", "0.25", "faults.deadline", "3"])
    assert (cfg.faults.dropout_before, cfg.faults.deadline, cfg.faults.client_seconds) == (0.25, 3.0, 1.0)
    assert cfg.faults.active and not load_config(None).faults.active


def test_fedkrso_replays_a_round_without_replies(tiny):
    """FedKRSO: a client catching up over a round nobody answered gets an empty replay entry (0 bytes) and trains."""
    # Prepare
    sim = Simulation(tiny("federate.method", "fedkrso", "fedkrso.catchup", "replay"), quiet=True)
    sim.setup()
    strategy = sim.method.strategy
    strategy.configure_round(1, [0])
    strategy.aggregate(1, [])
    # Execute
    down = strategy.configure_round(2, [0])[0]
    uplink = sim._fit_client(2, 0, down.detached_copy())
    report = strategy.aggregate(2, [Reply(0, uplink)])
    # Assert
    replayed = {k: v for k, v in {**down.tensors, **down.control}.items() if k.startswith("krso.replay")}
    assert replayed and all(v.numel() == 0 for v in replayed.values())
    assert report.accepted == [0] and strategy.version == 2


@pytest.mark.parametrize("method", ["fedit", "hafl", "fedkrso", "fedhft"])
def test_a_run_nobody_ever_answers_ends_with_the_initial_model(tiny, method):
    """dropout_before 1: every round is reported empty, nothing divides by zero, the final model is the initial one."""
    sim = Simulation(tiny(*METHODS[method], "faults.dropout_before", "1.0"), quiet=True)
    summary = sim.run()
    rounds = summary["per_round"]
    assert summary["faults"]["rounds_without_replies"] == [1, 2, 3, 4]
    assert [r["replies"] for r in rounds[1:]] == [0] * 4 and summary["comm"]["uplink_bytes"] == 0
    assert summary["timing"]["local_steps"] == 0 and summary["timing"]["median_step_seconds"] is None
    assert {k: v for k, v in rounds[-1].items() if k.startswith("test_")} == {
        k: v for k, v in rounds[0].items() if k.startswith("test_")}
