"""``fs-gmfl bench perf --quick`` on a tiny model: every block produces its figures, and the evaluation variants
agree on the metrics (the benchmark's ratios are only meaningful if they do)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from fs_gmfl.bench.perf import main
from tests.conftest import TINY


@pytest.fixture
def tiny_yaml(tmp_path):
    pairs = dict(zip(TINY[::2], TINY[1::2]))
    cfg: dict = {}
    for key, value in pairs.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_quick_eval_block_variants_agree_on_the_metrics(tmp_path, tiny_yaml, single_thread):
    out = tmp_path / "perf"
    assert main(["--quick", "--cfg", str(tiny_yaml), "--out", str(out), "--blocks", "eval"]) == 0
    block = json.loads((out / "results.json").read_text())["eval"]
    before, now = block["metrics"]["before (row order, no_grad, fp32)"], block["metrics"][
        "now (length-sorted, inference_mode, fp32)"]
    assert before["acc"] == now["acc"] and now["loss"] == pytest.approx(before["loss"], rel=1e-5)
    assert block["rows"] == 16 and set(block["ratio_to_before"]) == set(block["metrics"])


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity call on this platform")
def test_quick_perf_bench_on_a_tiny_model(tmp_path, tiny_yaml, single_thread):
    out = tmp_path / "perf"
    assert main(["--quick", "--cfg", str(tiny_yaml), "--out", str(out), "--blocks", "train,eval,threads"]) == 0
    results = json.loads((out / "results.json").read_text())
    train = results["train"]
    assert train["steps"] == 2 * 3  # 2 clients per round x 3 local steps, 1 round
    assert set(train["median_s"]) == {"simulator none", "plain loop none", "simulator bfloat16", "plain loop bfloat16"}
    assert all(v > 0 for v in train["median_s"].values())
    metrics = results["eval"]["metrics"]
    accs = {m["acc"] for m in metrics.values()}
    before, now = metrics["before (row order, no_grad, fp32)"], metrics["now (length-sorted, inference_mode, fp32)"]
    assert before["acc"] == now["acc"] and now["loss"] == pytest.approx(before["loss"], rel=1e-5)
    assert len(accs) <= 2  # bf16 may flip a prediction of the random model, fp32 variants may not
    assert results["eval"]["ratio_to_before"]["before (row order, no_grad, fp32)"] == 1.0
    runs = results["threads"]["runs"]
    chosen = runs["affinity-chosen (1 thread)"][0]
    default = runs[f"torch default ({os.cpu_count()} threads)"][0]
    assert chosen["threads"] == 1 and chosen["affinity"] == 1
    assert default["threads"] == os.cpu_count() and default["affinity"] == 1
    assert "vs before" in (out / "table.md").read_text()


def test_repeated_federatedscope_runs_read_their_own_outputs(tmp_path, monkeypatch):
    """FederatedScope puts a repeated run into <outdir>/sub_exp_<time>/ when <outdir> exists; each repeat of the
    benchmark must read the FL time of its own run (it once read the first run's three times)."""
    import argparse
    import json as _json
    import subprocess

    import torch as _torch

    from fs_gmfl.bench import fshost

    minutes = iter([0.9, 0.5, 0.25])

    def fake_federatedscope(cmd, **kwargs):
        out = tmp_path / "fs"
        target = out / "sub_exp_later" if out.exists() else out  # what FederatedScope does
        target.mkdir(parents=True)
        (target / "summary.json").write_text("{}")
        (target / "eval_results.log").write_text("")
        (target / "system_metrics.log").write_text(_json.dumps({"id": 0, "fl_end_time_minutes": next(minutes)}))
        _torch.save({"model": {}}, tmp_path / "final_fs.ckpt")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fshost.subprocess, "run", fake_federatedscope)
    args = argparse.Namespace(cfg="x.yaml", rounds=1, set=[])
    seconds = [fshost.run_federatedscope(args, tmp_path)["fl_s"] for _ in range(3)]
    assert seconds == pytest.approx([54.0, 30.0, 15.0])


def test_hosts_block_passes_hosts_set_to_every_simulator_variant(tmp_path, tiny_yaml, monkeypatch):
    """The simulator's three variants (1 and 2 threads fp32, 2 threads bf16 autocast) run the same YAML with the
    ``--hosts-set`` overrides; Flower and FederatedScope are left out here (their own tests run them)."""
    from fs_gmfl.bench import perf

    monkeypatch.setattr(perf, "flower_available", lambda: False)
    monkeypatch.setattr(perf, "federatedscope_python", lambda args: None)
    out = tmp_path / "perf"
    assert main(["--blocks", "hosts", "--hosts-cfg", str(tiny_yaml), "--hosts-rounds", "1", "--repeats", "1",
                 "--hosts-set", "seed", "7", "--hosts-set", "federate.sample_client_num", "1", "--out", str(out)]) == 0
    block = json.loads((out / "results.json").read_text())["hosts"]
    assert set(block["median_s_per_round"]) == {"simulator, sequential (1 thread, fp32)",
                                                "simulator, sequential (2 threads, fp32)",
                                                "simulator at its best (2 threads, bf16 autocast)"}
    for name, autocast in (("sim_1t", "none"), ("sim_2t", "none"), ("sim_2t_bfloat16", "bfloat16")):
        saved = yaml.safe_load((out / "hosts" / name / "config.yaml").read_text())
        assert (saved["seed"], saved["federate"]["sample_client_num"], saved["train"]["autocast"]) == (7, 1, autocast)
        assert json.loads((out / "hosts" / name / "summary.json").read_text())["per_round"][-1]["round"] == 1


@pytest.mark.parametrize("pair, message", [
    (["federate.total_round_num", "nan"], "'federate.total_round_num' = 'nan' is not allowed"),
    (["data.splitter", "nope"], "'data.splitter' = 'nope' is not allowed"),
    (["no.such_key", "1"], "unknown config key 'no'"),
])
def test_bad_hosts_set_is_one_line_and_exit_2_before_any_host_runs(tmp_path, tiny_yaml, pair, message, capsys):
    from fs_gmfl.cli import main as cli_main

    out = tmp_path / "perf"
    assert cli_main(["bench", "perf", "--blocks", "hosts", "--hosts-cfg", str(tiny_yaml), "--hosts-set", *pair,
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "hosts").exists()
