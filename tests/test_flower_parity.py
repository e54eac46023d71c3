"""Flower host parity: every method, two rounds, the same global model bit for bit and the same bytes as the simulator.

Clients train two at a time on Flower's simulation engine (two Ray actors, one torch thread each) and the replies
are folded in client-id order (``flower.fold_order: client_id``), so the fold order, hence every bit, is the
simulator's although the clients run concurrently. The table comes from the registry (``tests/method_cases.py``),
so a newly registered method is covered without editing this file.
"""

from __future__ import annotations

import json

import pytest
import torch
from flower_helpers import needs_flower, simulate_many
from method_cases import registered_cases

from fs_gmfl.hosts.sim.runner import Simulation

pytestmark = [needs_flower, pytest.mark.usefixtures("single_thread")]

CASES = registered_cases(
    adjust={"hafl": ["hafl.scheme", "truncation",
                     "hafl.profiles", "[{clients: [0, 1], rank: 1}, {clients: [2, 3], rank: 4}]"],
            "fedkrso": ["fedkrso.num_seeds", "2", "fedkrso.interval", "2"],
            "fedhft": ["fedhft.eval", "personalised", "data.client_val_fraction", "0.25"]},
    variants={"gmfl_fedit": ["gmfl.use", "True", "gmfl.c", "0.5", "gmfl.period", "1"],
              "gmfl_ffa": ["federate.method", "ffa_lora", "gmfl.use", "True", "gmfl.c", "0.5", "gmfl.period", "1"],
              "hafl_freezing": ["federate.method", "hafl", "hafl.scheme", "freezing",
                                "hafl.profiles", "[{clients: [0, 1], freeze_ratio: 0.5}, {clients: [2, 3], freeze_ratio: 0.0}]"]})
COMMON = ["federate.total_round_num", "2", "eval.freq", "1", "federate.sample_client_num", "3",
          "flower.fold_order", "client_id", "flower.client_threads", "1", "flower.max_parallel", "2"]
TIMING_KEYS = {"median_step_seconds", "train_seconds", "eval_seconds"}


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case on the simulator and on Flower (one Flower simulation for the whole table)."""
    from conftest import tiny_config

    sim, flower = {}, {}
    for name, overrides in CASES.items():
        sim[name] = Simulation(tiny_config(tmp_path_factory.mktemp(f"sim_{name}"), *overrides, *COMMON), quiet=True)
        sim[name].run()
    configs = [tiny_config(tmp_path_factory.mktemp(f"flower_{name}"), *overrides, *COMMON)
               for name, overrides in CASES.items()]
    outcomes = dict(zip(CASES, simulate_many(configs)))
    return sim, outcomes


#: causal language modelling (tiny Llama, FederatedScope-LLM records, exact-match and loss evaluation).
CAUSAL_CASES = registered_cases(adjust={"fedkrso": ["fedkrso.num_seeds", "2", "fedkrso.interval", "2"]})


@pytest.fixture(scope="module")
def causal_runs(tmp_path_factory):
    """Every registered method as a causal LM on the simulator and on Flower (one Flower simulation)."""
    from test_causal_lm import causal_config

    common = ["flower.fold_order", "client_id", "flower.client_threads", "1", "eval.freq", "1"]
    sim = {}
    for name, overrides in CAUSAL_CASES.items():
        sim[name] = Simulation(causal_config(tmp_path_factory.mktemp(f"sim_{name}"), *overrides, *common), quiet=True)
        sim[name].run()
    configs = [causal_config(tmp_path_factory.mktemp(f"flower_{name}"), *overrides, *common)
               for name, overrides in CAUSAL_CASES.items()]
    return sim, dict(zip(CAUSAL_CASES, simulate_many(configs)))


@pytest.mark.parametrize("case", list(CASES))
def test_two_rounds_on_flower_equal_the_simulator(runs, case):
    check_parity(*runs, case)


@pytest.mark.parametrize("case", list(CAUSAL_CASES))
def test_causal_lm_on_flower_equals_the_simulator(causal_runs, case):
    check_parity(*causal_runs, case)
    assert "test_exact_match" in summary_of(causal_runs[1][case].run)["final"]


def check_parity(sim, outcomes, case):
    outcome = outcomes[case]
    assert outcome.error is None, repr(outcome.error)
    ours, theirs = sim[case].method.strategy.global_adapter(), outcome.run.method.strategy.global_adapter()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert comparable(summary_of(outcome.run)["per_round"]) == comparable(summary_of(sim[case])["per_round"])
    assert outcome.summary["comm"] == sim[case].ledger.totals()
    assert outcome.summary["comm"]["uplink_bytes"] > 0 and outcome.summary["comm"]["downlink_bytes"] > 0


def summary_of(run: Simulation) -> dict:
    return json.loads((run.run_dir / "summary.json").read_text())
