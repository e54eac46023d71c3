"""The fs-gmfl command: exit codes, one-line errors, comm JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fs_gmfl.cli import main


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fs_gmfl", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("args,fragment", [
    (["run", "--cfg", "/nonexistent.yaml"], "does not exist"),
    (["run", "--cfg", "/dev/null", "gmfl.c", "7"], "gmfl.c"),
    (["run", "--cfg", "/dev/null", "gmfl.bogus", "1"], "unknown config key 'gmfl.bogus'"),
    (["run", "--cfg", "/dev/null", "federate.mode", "distributed"], "federate.mode"),
    (["run", "--cfg", "/dev/null", "data.type", "csv:/nonexistent.csv"], "data.type"),
    (["run", "--cfg", "/dev/null", "model.type", "tiny_bert", "llm.adapter.args", "[{target_modules: [c_attn]}]",
      "data.type", "synthetic"], "'c_attn' does not exist"),
    (["comm", "--cfg", "/dev/null", "model.type", "/no/such/model"], "model.type"),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(args, fragment):
    """Bad configuration or input: exit code 2, one line on stderr, no traceback."""
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fs-gmfl: error:"), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_comm_gpt2_large_rank16_is_112_5_mib_for_10_clients(capsys):
    """GPT-2-Large c_attn: 36 x (1280 + 3840) = 184,320 params per unit rank; x16 x4 B x10 = 112.5 MiB (meta device)."""
    assert main(["comm", "--cfg", "/dev/null", "model.type", "gpt2-large", "model.num_labels", "20",
                 "llm.adapter.args", "[{r: 16, lora_alpha: 32}]", "federate.client_num", "100",
                 "federate.sample_client_num", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapter"]["lora_params"] == 16 * 184_320 == 2_949_120
    assert out["adapter"]["lora_tensors"] == 72
    assert out["per_round"]["uplink_lora_bytes"] == 10 * 2_949_120 * 4 == 117_964_800
    assert out["per_round"]["uplink_lora_mib"] == 112.5
    assert out["profiles"]["default"]["uplink"]["head_bytes"] == 1280 * 20 * 4  # GPT-2 score head, no bias
    assert out["profiles"]["default"]["uplink"]["control_bytes"] == 8


def test_comm_gmfl_schedule_roberta_base(capsys):
    """RoBERTa-base q,v r=16: 48 tensors of 12,288 params; GMFL blocks freeze 0, 7, 9, ... tensors."""
    assert main(["comm", "--cfg", "/dev/null", "model.type", "roberta-base", "llm.adapter.args",
                 "[{r: 16, lora_alpha: 32}]", "gmfl.use", "True", "federate.total_round_num", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapter"]["lora_tensors"] == 48 and out["adapter"]["lora_params"] == 48 * 12_288
    blocks = out["gmfl"]["schedule"]
    assert [b["frozen"] for b in blocks] == [0, 7, 9, 12, 14, 16, 19, 21, 24, 26]
    base = out["profiles"]["default"]["uplink"]["bytes"]
    assert blocks[1]["uplink_bytes_min"] == blocks[1]["uplink_bytes_max"] == base - 7 * 12_288 * 4
    frozen_tensor_rounds = 20 * sum(b["frozen"] for b in blocks)  # 20 * 148 (the ratios average 0.315)
    expected = frozen_tensor_rounds * 12_288 * 4 / (200 * base)
    assert out["gmfl"]["mean_uplink_saving_min"] == pytest.approx(expected, rel=1e-12)
    assert out["gmfl"]["mean_uplink_saving_max"] == pytest.approx(expected, rel=1e-12)  # equal-size tensors


@pytest.mark.parametrize("data_args,num_labels", [
    (["data.type", "health_tweets"], 16), (["data.type", "news_articles"], 9),
    (["data.type", "synthetic", "data.synthetic_num_classes", "5"], 5)])
def test_comm_sizes_the_head_from_the_dataset_classes(capsys, data_args, num_labels):
    """model.num_labels 0: the head has as many outputs as the packaged dataset has classes, as in a real run."""
    base = ["comm", "--cfg", "/dev/null", "model.type", "tiny_bert"]
    assert main([*base, *data_args]) == 0
    from_data = json.loads(capsys.readouterr().out)
    assert main([*base, "model.num_labels", str(num_labels)]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert from_data["num_labels"] == num_labels
    head = from_data["profiles"]["default"]["uplink"]["head_bytes"]
    assert head == explicit["profiles"]["default"]["uplink"]["head_bytes"]
    assert head == (32 * num_labels + num_labels) * 4  # tiny_bert hidden 32: classifier weight + bias, fp32


def test_keys_lists_gmfl_section(capsys):
    """fs-gmfl keys gmfl prints every gmfl key with its help."""
    assert main(["keys", "gmfl"]) == 0
    out = capsys.readouterr().out
    for key in ("gmfl.use", "gmfl.c", "gmfl.beta", "gmfl.period", "gmfl.max_ratio", "gmfl.tie_policy",
                "gmfl.stat", "gmfl.normalize", "gmfl.downlink"):
        assert key in out
    assert not any(line.startswith("federate.") for line in out.splitlines())
