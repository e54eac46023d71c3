"""The GMFL benchmark pipeline on a tiny model: outputs, and measured saving equal to the schedule's prediction."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from fs_gmfl.bench.common import MAJORITY_LABEL, fmt_pm, markdown_table, mean_curve
from fs_gmfl.bench.gmfl import common_overrides, main, parse_args
from fs_gmfl.config import load_config
from fs_gmfl.hosts.common.corpus import HashTokenizer
from fs_gmfl.hosts.common.data import federated_data_for, majority_class_rate


def test_bench_gmfl_tiny_end_to_end(tmp_path, capsys):
    """--quick on tiny_bert + synthetic data: every method runs, files exist, saving == predicted saving."""
    out = tmp_path / "b"
    argv = ["--quick", "--model", "tiny_bert", "--dataset", "synthetic", "--clients", "6", "--per-round", "2",
            "--rank", "4", "--tok-len", "16", "--subsample", "1.0", "--batch-size", "8", "--timing-steps", "3",
            "--out", str(out), "--set", "model.hidden_size", "16", "--set", "model.vocab_size", "200",
            "--set", "data.synthetic_num_samples", "200"]
    code = main(argv)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"FedIT", "FedIT+GMFL", "FFA-LoRA", "FFA-LoRA+GMFL"}
    for gm, base in (("FedIT+GMFL", "FedIT"), ("FFA-LoRA+GMFL", "FFA-LoRA")):
        measured = 1 - results["runs"][gm][0]["comm"]["uplink_bytes"] / results["runs"][base][0]["comm"]["uplink_bytes"]
        lo, hi = results["predicted_saving"][gm]
        assert measured > 0 and lo == hi
        assert measured == pytest.approx(lo, rel=1e-9)  # equal-size tensors, no ties: exact
    assert {"FedIT", "GMFL ratio 0"} <= set(results["timing"])
    assert (out / "gmfl_bench.png").is_file()
    # every row carries that run's final accuracy, and the reference row the test split's majority-class rate,
    # counted here independently of the benchmark (Counter over the labels of the same split)
    table = (out / "table.md").read_text()
    for name, runs in results["runs"].items():
        assert f"| {name} | {runs[0]['final']['test_acc'] * 100:.1f} ± 0.0 |" in table
    cfg = load_config(None, [*common_overrides(parse_args(argv), out), "seed", "0"])
    labels = federated_data_for(cfg, HashTokenizer(1000)).test.labels.tolist()
    majority = Counter(labels).most_common(1)[0][1] / len(labels)
    assert results["test_majority_rate"] == [pytest.approx(majority)]
    assert f"| {MAJORITY_LABEL} | {majority * 100:.1f} ± 0.0 | {majority * 100:.1f} ± 0.0 |" in table


def test_table_helpers():
    """mean ± std formatting, markdown table, averaged curves."""
    assert fmt_pm([0.5, 0.7]) == "60.0 ± 14.1"
    assert markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    runs = [{"per_round": [{"round": 0, "test_acc": 0.5}, {"round": 1, "uplink_bytes": 10, "test_acc": 0.7}]},
            {"per_round": [{"round": 0, "test_acc": 0.7}, {"round": 1, "uplink_bytes": 30, "test_acc": 0.9}]}]
    curve = mean_curve(runs)["per_round"]
    assert curve[1] == {"round": 1, "uplink_bytes": 20, "test_acc": pytest.approx(0.8)}


def test_majority_class_rate_hand_computed():
    """Labels [2, 0, 2, 1, 2, 0]: class 2 holds 3 of 6 -> 0.5; one class -> 1.0; no labels -> 0.0."""
    assert majority_class_rate(torch.tensor([2, 0, 2, 1, 2, 0])) == 0.5
    assert majority_class_rate(torch.tensor([4, 4, 4])) == 1.0
    assert majority_class_rate(torch.tensor([], dtype=torch.long)) == 0.0


def test_methods_option_selects_in_benchmark_order_and_refuses_an_unknown_name(capsys):
    """--methods keeps the benchmark's order (a variant may run without its base); an unknown name exits 2."""
    args = parse_args(["--methods", "FedIT+GMFL(random),FedIT"])
    assert args.methods == ["FedIT", "FedIT+GMFL(random)"]
    assert parse_args([]).methods == ["FedIT", "FedIT+GMFL", "FFA-LoRA", "FFA-LoRA+GMFL"]
    assert parse_args(["--methods", "FedIT+GMFL(random)"]).methods == ["FedIT+GMFL(random)"]
    with pytest.raises(SystemExit) as exc:
        parse_args(["--methods", "FedIT,GMFL"])
    assert exc.value.code == 2 and "unknown method 'GMFL'" in capsys.readouterr().err


def test_predicted_saving_of_a_profiled_base_is_the_share_and_bytes_weighted_expectation(monkeypatch):
    """Two profiles, shares 0.5 / 0.5, uplinks 100 / 300 bytes, schedule savings 20 % / 10 %: the clients keep
    0.5 * 100 * 0.8 + 0.5 * 300 * 0.9 = 175 of 200 expected bytes, a 12.5 % saving (HAFL / FedHFT + GMFL)."""
    import fs_gmfl.bench.gmfl as bench

    def profile(up: int, saving: float) -> dict:
        return {"clients_share": 0.5, "uplink": {"bytes": up},
                "gmfl": {"mean_uplink_saving_min": saving, "mean_uplink_saving_max": saving}}

    monkeypatch.setattr(bench, "estimate", lambda cfg: {"profiles": {"a": profile(100, 0.2), "b": profile(300, 0.1)}})
    assert bench.predicted_saving(None) == (pytest.approx(0.125), pytest.approx(0.125))
