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


def test_profile_cost_bytes_are_the_trained_tensors_and_adams_state():
    """--profile-cost's child measurement, run in-process on tiny_bert: the bytes follow the rank by hand arithmetic.

    tiny_bert has 2 layers x (query, key, value) = 6 adapted modules of width 16; a rank-r LoRA on one is
    A (r x 16) + B (16 x r) = 32 r float32 values. Adam keeps exp_avg and exp_avg_sq of each trained tensor
    plus a 4-byte step per tensor (12 tensors). Freezing (IFALoRA) trains n of 16 components through a gradient
    mask, so its tensors and optimizer state stay at rank 16.
    """
    from fs_gmfl.bench.hafl import cost_profiles, cost_rows, measure_profile_cost

    profiles = {label: (method, profile) for label, method, profile in cost_profiles([1, 16])}
    assert list(profiles) == ["ITALoRA r=1", "ITALoRA r=16", "IFALoRA n=1", "IFALoRA n=16"]
    assert profiles["IFALoRA n=1"][1] == ["hafl.profiles", "[{share: 1.0, freeze_ratio: 0.9375}]"]
    measured = {}
    for label, (method, profile) in profiles.items():
        measured[label] = row = measure_profile_cost(method, [*TINY, *profile], warmup=1, timed=2)
        row.update(median_step_seconds=1.0, min_step_seconds=1.0, max_step_seconds=1.0)
        assert len(row["step_seconds"]) == 2 and row["peak_rss_bytes"] >= row["rss_before_training_bytes"] > 0
    for label, r, n in [("ITALoRA r=1", 1, 1), ("ITALoRA r=16", 16, 16), ("IFALoRA n=1", 16, 1),
                        ("IFALoRA n=16", 16, 16)]:
        row = measured[label]
        assert row["trainable_params"] == 6 * 32 * r and row["trained_params"] == 6 * 32 * n, label
        assert row["param_bytes"] == 6 * 32 * r * 4, label
        assert row["optimizer_state_bytes"] == 2 * 6 * 32 * r * 4 + 12 * 4, label
    rows = cost_rows(measured)
    assert rows[0][:3] == ["ITALoRA r=1", "192", "192"] and rows[0][4] == "1.00"
    assert rows[0][5:7] == ["0.8", "1.5"]  # 768 B and 1,584 B in KiB
    assert all(row["peak_rss_reset_before_training"] for row in measured.values())  # Linux
