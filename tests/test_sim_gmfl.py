"""End-to-end GMFL behaviour on the embedded simulator with a tiny random BERT."""

from __future__ import annotations

import json

import pytest
import torch

from fs_gmfl.core.adapter import LORA_A, adapter_parameters, kind_of
from fs_gmfl.core.gmfl.wrapper import gmfl_lora_client
from fs_gmfl.core.message import Message, pack_bits
from fs_gmfl.hosts.common.corpus import HashTokenizer
from fs_gmfl.hosts.common.data import build_federated_data
from fs_gmfl.hosts.common.models import build_backbone
from fs_gmfl.hosts.sim.runner import Simulation
from fs_gmfl.hosts.sim.training import train_local

# tiny_bert, hidden 16, 2 layers, LoRA r=4 on query,value: each A is 4x16 and each B 16x4 (64 params);
# 2 layers x 2 modules x 2 factors = 8 tensors = 512 params; head 2x16 + 2 = 34 params.
LORA_PARAMS, HEAD_PARAMS = 512, 34


def run(cfg):
    sim = Simulation(cfg, quiet=True)
    summary = sim.run()
    return sim, summary


def test_run_writes_outputs_with_required_fields(tiny, tmp_path):
    """config.yaml, eval_results.log (JSON lines), summary.json with the documented keys, plot, comm log."""
    sim, summary = run(tiny("gmfl.use", "True", "gmfl.period", "2", "expname", "out"))
    run_dir = tmp_path / "out"
    for name in ("config.yaml", "eval_results.log", "summary.json", "comm_log.jsonl", "curves.png"):
        assert (run_dir / name).is_file(), name
    written = json.loads((run_dir / "summary.json").read_text())
    for key in ("method", "rounds", "final", "comm", "per_round", "wall_seconds", "peak_rss_bytes"):
        assert key in written
    assert written["method"] == "fedit+gmfl" and written["rounds"] == 4
    assert {"test_acc", "test_loss"} <= set(written["final"])
    assert {"uplink_bytes", "downlink_bytes"} <= set(written["comm"])
    rows = written["per_round"][1:]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all({"uplink_bytes", "downlink_bytes", "frozen_fraction"} <= set(r) for r in rows)
    evals = [json.loads(line) for line in (run_dir / "eval_results.log").read_text().splitlines()]
    assert [e["Round"] for e in evals] == [0, 2, 4] and "test_acc" in evals[-1]["Results_raw"]


def test_bytes_match_hand_arithmetic(tiny):
    """FedIT: uplink per client = (512 + 34) * 4 + 8 (sample count); downlink = 546 * 4; 2 clients, 4 rounds."""
    sim, summary = run(tiny())
    up_client = (LORA_PARAMS + HEAD_PARAMS) * 4 + 8
    down_client = (LORA_PARAMS + HEAD_PARAMS) * 4
    assert summary["comm"]["uplink_bytes"] == 4 * 2 * up_client
    assert summary["comm"]["downlink_bytes"] == 4 * 2 * down_client
    assert summary["comm"]["uplink_control_bytes"] == 4 * 2 * 8
    rows = [t.as_row() for t in sim.ledger.transfers]
    assert len(rows) == 16 and all(r["bytes"] in (up_client, down_client) for r in rows)


def test_gmfl_uplink_saving_equals_frozen_tensor_bytes(tiny):
    """Each round's uplink = base uplink - bytes of the tensors frozen in that round, exactly, and freezing grows."""
    sim, summary = run(tiny("gmfl.use", "True", "gmfl.period", "1", "gmfl.c", "0.25", "gmfl.beta", "0.25",
                            "federate.total_round_num", "4"))
    base_up = (LORA_PARAMS + HEAD_PARAMS) * 4 + 8
    rows = summary["per_round"][1:]
    for row in rows:
        frozen_bytes = round(row["frozen_numel_fraction"] * LORA_PARAMS) * 4
        assert row["uplink_bytes"] == 2 * (base_up - frozen_bytes)
    fractions = [r["frozen_fraction"] for r in rows]
    # refresh k after round k uses ratio c + k*beta = 0.5, 0.75, then the 0.95 clamp: floor(0.95 * 8) = 7 of 8
    assert fractions == [0.0, 0.5, 0.75, 0.875]


@pytest.mark.parametrize("method", ["fedit", "ffa_lora"])
def test_ratio_zero_reproduces_base_method_bit_for_bit(tiny, method):
    """c = beta = 0: GMFL freezes nothing and every global tensor and metric equals the base method's."""
    base_sim, base = run(tiny("federate.method", method, "expname", "base"))
    gm_sim, gm = run(tiny("federate.method", method, "gmfl.use", "True", "gmfl.c", "0", "gmfl.beta", "0",
                          "gmfl.period", "1", "expname", "gm"))
    base_state, gm_state = base_sim.method.strategy.global_adapter(), gm_sim.method.strategy.global_adapter()
    assert all(torch.equal(base_state[k], gm_state[k]) for k in base_state)
    assert base["final"] == gm["final"]
    assert base["comm"]["uplink_payload_bytes"] == gm["comm"]["uplink_payload_bytes"]
    assert all(r["frozen_fraction"] == 0 for r in gm["per_round"][1:])


def test_runs_are_deterministic(tiny):
    """Same seed, same results; another seed, other results."""
    a_sim, a = run(tiny("gmfl.use", "True", "gmfl.period", "2", "expname", "a"))
    b_sim, b = run(tiny("gmfl.use", "True", "gmfl.period", "2", "expname", "b"))
    c_sim, c = run(tiny("gmfl.use", "True", "gmfl.period", "2", "expname", "c", "seed", "1"))
    sa, sb, sc = (s.method.strategy.global_adapter() for s in (a_sim, b_sim, c_sim))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_ffa_lora_never_changes_lora_a(tiny):
    """FFA-LoRA: every lora_A equals its initial value after training; lora_B moved."""
    sim, _ = run(tiny("federate.method", "ffa_lora", "train.optimizer.weight_decay", "0.1"))
    initial = sim.method.strategy.__class__  # noqa: F841 (documentation of what is compared below)
    backbone = build_backbone(sim.cfg, 2)
    init = {k: p.detach() for k, p in adapter_parameters(backbone.model).items()}
    final = sim.method.strategy.global_adapter()
    for key, value in final.items():
        if kind_of(key) == LORA_A:
            assert torch.equal(value, init[key]), key
    assert any(not torch.equal(final[k], init[k]) for k in final if ".lora_B." in k)


def test_frozen_tensors_are_bit_identical_after_training_and_absent_from_upload(tiny):
    """AdamW with weight decay: frozen tensors keep every bit, get no grad or optimizer state, are not uploaded."""
    cfg = tiny("gmfl.use", "True", "train.optimizer.weight_decay", "0.5", "train.local_update_steps", "5")
    backbone = build_backbone(cfg, 2)
    model = backbone.model
    params = adapter_parameters(model)
    candidates = [k for k in params if kind_of(k) != "head"]
    frozen = set(candidates[::2])
    flags = [k not in frozen for k in candidates]
    before = {k: p.detach().clone() for k, p in params.items()}
    client = gmfl_lora_client("fedit", candidates)
    plan = client.prepare(model, Message(dict(before), {"mask": pack_bits(flags)}), {})
    data = build_federated_data(cfg.data, num_clients=4, tokenizer=HashTokenizer(200), max_length=16, seed=0,
                                vocab_size=200)
    stats = train_local(plan, data.client_data(0), cfg, rnd=1, client_id=0)
    uplink = client.finish(plan, stats, {})
    assert stats.steps == 5
    for key in frozen:
        assert torch.equal(params[key], before[key]) and params[key].grad is None and not params[key].requires_grad
    assert set(uplink.tensors) == set(params) - frozen
    assert all(not torch.equal(params[k], before[k]) for k in uplink.tensors)


def test_stateful_sync_clients_train_from_the_global_model(tiny, tmp_path):
    """stateful_sync: each sampled client's reconstructed adapter equals the server's global adapter."""
    cfg = tiny("gmfl.use", "True", "gmfl.period", "1", "gmfl.c", "0.25", "gmfl.downlink", "stateful_sync",
               "federate.total_round_num", "6", "expname", "sync")
    sim = Simulation(cfg, quiet=True)
    sim.setup()
    checks = []
    original = sim.method.client.prepare

    def spy(model, message, state):
        plan = original(model, message, state)
        checks.append(all(torch.equal(state["adapter"][k], expected[k]) for k in expected))
        return plan

    sim.method.client.prepare = spy
    stateless_bytes = 0
    for rnd in range(1, 7):
        expected = sim.method.strategy.global_adapter()
        row = sim.run_round(rnd)
        stateless_bytes += 2 * (LORA_PARAMS + HEAD_PARAMS) * 4
        assert row["downlink_payload_bytes"] <= 2 * (LORA_PARAMS + HEAD_PARAMS) * 4
    assert checks and all(checks)
    assert sim.ledger.totals()["downlink_payload_bytes"] < stateless_bytes
    assert sim.store.clients()  # caches live on disk, not in memory


def test_stateless_methods_keep_no_client_state(tiny, tmp_path):
    """Memory does not grow with clients: stateless clients persist nothing between rounds."""
    sim, _ = run(tiny("federate.client_num", "8", "expname", "mem"))
    assert sim.store.clients() == []
