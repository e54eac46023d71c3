"""The HAFL benchmark pipeline on a tiny model: every method and profile runs, and the outputs are consistent."""

from __future__ import annotations

import json

import pytest

from fs_gmfl.bench.common import MAJORITY_LABEL
from fs_gmfl.bench.hafl import eval_freq, main, method_config, per_seed_rows
from fs_gmfl.hosts.common.corpus import HashTokenizer
from fs_gmfl.hosts.common.data import federated_data_for

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["model.type", "tiny_bert", "model.hidden_size", "16", "model.vocab_size", "200", "data.type", "synthetic",
        "data.synthetic_num_samples", "200", "data.synthetic_num_classes", "3", "llm.tok_len", "16",
        "federate.client_num", "6", "federate.sample_client_num", "3", "dataloader.batch_size", "8"]


@pytest.mark.parametrize("rounds,freq", [(20, 5), (2, 1), (30, 5), (100, 25), (16, 4)])
def test_eval_freq_hits_the_halfway_round(rounds, freq):
    """The evaluation period divides rounds / 2."""
    assert eval_freq(rounds) == freq and (rounds // 2) % freq == 0


def test_bench_hafl_tiny_end_to_end(tmp_path):
    """--quick on tiny_bert + synthetic data: five methods, eight profiles, uplink ratios from the real ledger."""
    out = tmp_path / "b"
    sets = [w for i in range(0, len(TINY), 2) for w in ("--set", TINY[i], TINY[i + 1])]
    assert main(["--quick", "--out", str(out), *sets]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert list(runs) == ["HomLoRA r=16", "HomLoRA r=2", "ITALoRA", "IFALoRA", "IFZLoRA"]
    # uplink per client = n_k components x 6 modules (2 layers x q,k,v) x (16 + 16) floats x 4 B, plus control
    assert runs["IFALoRA"][0]["comm"]["uplink_payload_bytes"] == runs["IFZLoRA"][0]["comm"]["uplink_payload_bytes"]
    hom16 = runs["HomLoRA r=16"][0]["comm"]["uplink_payload_bytes"]
    assert hom16 == 2 * 3 * 16 * 6 * 32 * 4
    assert runs["HomLoRA r=2"][0]["comm"]["uplink_payload_bytes"] == hom16 // 8
    profiles = results["profiles"]
    assert len(profiles) == 8 and profiles["HomLoRA r=16"]["step_time_vs_homlora_r16"] == 1.0
    assert profiles["ITALoRA r=2"]["trainable_params"] == 2 * 6 * 32
    assert profiles["IFALoRA/IFZLoRA n=2"]["trainable_params"] == 16 * 6 * 32
    assert profiles["IFALoRA/IFZLoRA n=2"]["trained_params"] == 2 * 6 * 32
    assert all(p["peak_step_bytes"] > 0 for p in profiles.values())
    table = (out / "table.md").read_text()
    assert (out / "hafl_bench.png").is_file()
    # rows carry the runs' accuracies; the reference row the majority class of seed 0's test split (hand count)
    acc = {r["round"]: r["test_acc"] * 100 for r in runs["IFALoRA"][0]["per_round"] if "test_acc" in r}
    assert f"| IFALoRA | {acc[1]:.1f} ± 0.0 | {acc[2]:.1f} ± 0.0 | " in table
    labels = federated_data_for(method_config("IFALoRA", [*TINY, "seed", "0"]), HashTokenizer(1000)).test.labels
    majority = max(labels.tolist().count(c) for c in set(labels.tolist())) / len(labels)
    assert results["test_majority_rate"] == [pytest.approx(majority)]
    assert f"| {MAJORITY_LABEL} | {majority * 100:.1f} ± 0.0 | {majority * 100:.1f} ± 0.0 | - | - | - | 1 |" in table
    assert f"| {MAJORITY_LABEL} | {majority * 100:.1f} | - |" in table  # per-seed table
    # a second call reuses the finished runs
    assert main(["--quick", "--out", str(out), "--no-profiles", *sets]) == 0


def _summary(final_acc: float, rounds: int = 4) -> dict:
    """A run summary whose test accuracy is ``final_acc`` at round ``rounds``."""
    return {"per_round": [{"round": 2, "test_acc": 0.1}, {"round": rounds, "test_acc": final_acc}]}


def test_per_seed_rows_pair_each_seed_with_the_reference():
    """Each method's gap to HomLoRA r=16 is taken seed by seed, then averaged."""
    results = {"HomLoRA r=16": [_summary(0.50), _summary(0.60)], "IFALoRA": [_summary(0.45), _summary(0.61)]}
    rows = per_seed_rows(results, rounds=4)
    assert rows[0] == ["HomLoRA r=16", "50.0", "60.0", "-"]
    # gaps -5.0 and +1.0 points, mean -2.0
    assert rows[1] == ["IFALoRA", "45.0", "61.0", "-2.0 (-5.0, +1.0)"]
