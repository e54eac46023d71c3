"""The FedHFT benchmark's local-only baseline (``--methods local``): each client trains alone, never aggregated."""

from __future__ import annotations

import argparse

import pytest
import torch

from fs_gmfl.bench.fedhft import (local_only_results, local_rounds, markdown, method_name, summarise,
                                  train_local_only)
from fs_gmfl.hosts.sim.runner import Simulation, temporarily_loaded
from fs_gmfl.hosts.sim.training import evaluate

LOCAL = ["federate.method", "fedit", "data.client_val_fraction", "0.25", "train.optimizer.lr", "0.01",
         "federate.total_round_num", "3"]


def simulation(cfg) -> Simulation:
    sim = Simulation(cfg, quiet=True)
    sim.setup()
    return sim


def test_one_client_local_only_equals_fedit_with_that_client_alone(tiny, single_thread):
    """With one client, FedAvg of its upload is its upload: R FedIT rounds = R rounds of local-only training."""
    cfg = tiny(*LOCAL, "federate.client_num", "1", "federate.sample_client_num", "1")
    fedit = simulation(cfg)
    for rnd in range(1, 4):
        fedit.run_round(rnd)
    assert local_rounds(cfg, 0, "sampled") == local_rounds(cfg, 0, "all") == [1, 2, 3]
    local = train_local_only(simulation(cfg), 0, [1, 2, 3])
    federated = fedit.method.strategy.global_adapter()
    assert set(local) == set(federated)
    initial = simulation(cfg).method.strategy.global_adapter()
    assert any(not torch.equal(local[k], initial[k]) for k in local)  # it trained
    for key, value in federated.items():
        torch.testing.assert_close(local[key], value, rtol=0, atol=1e-6)


def test_a_clients_local_model_does_not_depend_on_the_clients_trained_before_it(tiny, single_thread):
    """The model is shared by all clients: client 2's result is the same alone and after clients 0 and 1."""
    sim = simulation(tiny(*LOCAL))
    alone = train_local_only(sim, 2, [1, 2])
    train_local_only(sim, 0, [1, 3])
    train_local_only(sim, 1, [2])
    after_others = train_local_only(sim, 2, [1, 2])
    for key, value in alone.items():
        assert torch.equal(after_others[key], value), key


def test_sampled_schedule_is_the_federated_runs_client_draw(tiny, single_thread):
    """``sampled``: a client trains in exactly the rounds the simulator samples it in (its round log)."""
    cfg = tiny(*LOCAL)
    sim = simulation(cfg)
    sampled = [sim.run_round(rnd)["clients"] for rnd in (1, 2, 3)]
    for cid in range(4):
        assert local_rounds(cfg, cid, "sampled") == [r for r in (1, 2, 3) if cid in sampled[r - 1]]
    assert sum(len(local_rounds(cfg, cid, "sampled")) for cid in range(4)) == 3 * 2  # 2 clients per round


def test_without_training_each_client_scores_the_initial_model_on_its_own_shard(tiny, single_thread):
    """lr 1e-12 (0 is refused; steps of about 1e-12 move no prediction): every client's accuracy is the
    initial adapter's on that client's own validation shard."""
    sim = simulation(tiny(*LOCAL, "train.optimizer.lr", "1e-12"))
    results = local_only_results(sim)
    assert sorted(results) == [0, 1, 2, 3]
    with temporarily_loaded(sim.model, sim.method.strategy.global_adapter()):
        for cid, (size, acc) in results.items():
            data = sim.data.client_val_data(cid)
            assert size == len(data)
            assert acc == evaluate(sim.model, data, batch_size=8, task="seq_cls")["acc"]


def test_local_only_row_has_no_global_accuracy_and_no_bytes_row():
    """The table prints '-' for the global accuracy (there is no global model) and no bytes row for it."""
    rec = {"dataset": "news_articles", "method": "local", "seed": 0, "personalised_acc": 0.5,
           "global_test_acc": float("nan"), "majority_baseline": 0.75, "uplink_bytes_per_round": 0.0,
           "downlink_bytes_per_round": 0.0, "full_model_params": 1000, "test_majority_rate": 0.2}
    for level in range(3):
        rec |= {f"personalised_acc_level{level}": 0.5, f"uplink_bytes_level{level}": 0.0,
                f"downlink_bytes_level{level}": 0.0}
    args = argparse.Namespace(clients=20, clients_per_round=8, rounds=6, local_steps=8, batch_size=8, rank=8,
                              lr=3e-3, alpha=0.1, seeds=[0])
    text = markdown(summarise([rec]), [], args)
    assert "| local | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | - | 0.750 |" in text
    assert "| local, s=" not in text


@pytest.mark.parametrize("name", ["fedit", "local", "fedhft_k4"])
def test_method_names(name):
    assert method_name(name) == name


def test_unknown_method_name_is_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="fedit, local or fedhft_k<K>"):
        method_name("locally")
