"""Bad input everywhere: every malformed configuration ends in one clear line and exit code 2.

One table across the FederatedScope sections and every method subtree (gmfl, hafl, fedkrso, fft, fedhft):
wrong types, out-of-range values, unknown keys, contradictory switches, missing data paths and backbones
without the requested target modules. Each row goes through ``fs_gmfl.cli.main`` in-process; a few rows also
run as a subprocess to prove the real exit status and the absence of a traceback. Rows already covered by
``test_config.py`` and ``test_cli.py`` are not repeated.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fs_gmfl.cli import main

#: a tiny valid run; each row appends its bad settings (later overrides win).
BASE = ["model.type", "tiny_bert", "model.hidden_size", "16", "model.vocab_size", "200", "data.type", "synthetic",
        "data.synthetic_num_samples", "40", "federate.client_num", "2", "federate.total_round_num", "1",
        "llm.tok_len", "8"]
HAFL = ["federate.method", "hafl"]
KRSO = ["federate.method", "fedkrso"]
HFT = ["federate.method", "fedhft", "fedhft.eval", "global"]

#: (overrides, key named in the message, fragment saying what is allowed)
TABLE = [
    # types
    (["federate.total_round_num", "abc"], "federate.total_round_num", "expected an integer"),
    (["federate.client_num", "2.5"], "federate.client_num", "expected an integer"),
    (["use_gpu", "maybe"], "use_gpu", "expected a boolean"),
    (["grad.grad_clip", "[1]"], "grad.grad_clip", "expected a number"),
    # ranges
    (["federate.total_round_num", "0"], "federate.total_round_num", "[1, inf)"),
    (["seed", "-1"], "seed", "[0, inf)"),
    (["dataloader.batch_size", "0"], "dataloader.batch_size", "[1, inf)"),
    (["train.optimizer.lr", "0"], "train.optimizer.lr", "(0.0, inf)"),
    (["train.optimizer.momentum", "1.0"], "train.optimizer.momentum", "[0.0, 1.0)"),
    (["data.subsample", "0"], "data.subsample", "(0.0, 1.0]"),
    (["train.autocast", "float16"], "train.autocast", "'none' or 'bfloat16' without use_gpu: True"),
    (["train.autocast", "fp8"], "train.autocast", "float16"),
    (["data.client_val_fraction", "1.0"], "data.client_val_fraction", "[0.0, 1.0)"),
    (["llm.tok_len", "2"], "llm.tok_len", "[4, inf)"),
    (["llm.adapter.args", "[{lora_dropout: 1.0}]"], "llm.adapter.args[0].lora_dropout", "[0.0, 1.0)"),
    (["eval.freq", "0"], "eval.freq", "[1, inf)"),
    # choices
    (["train.batch_or_epoch", "step"], "train.batch_or_epoch", "one of 'batch', 'epoch'"),
    (["train.scheduler.type", "linear"], "train.scheduler.type", "'constant', 'cosine_rounds', 'cosine_steps'"),
    (["model.task", "generation"], "model.task", "'seq_cls', 'causal_lm'"),
    (["llm.adapter.args", "[{init_lora_weights: pissa}]"], "llm.adapter.args[0].init_lora_weights",
     "'default', 'gaussian'"),
    (["eval.metrics", "[f1]"], "eval.metrics", "'acc', 'loss'"),
    (["data.splitter", "dirichlet"], "data.splitter", "'iid', 'lda'"),
    # gmfl
    (["gmfl.beta", "-0.1"], "gmfl.beta", "[0.0, 1.0]"),
    (["gmfl.stat", "l2"], "gmfl.stat", "'last_round_l1', 'period_sum_l1', 'ema_l1'"),
    (["gmfl.ema_decay", "1.0"], "gmfl.ema_decay", "(0.0, 1.0)"),
    (["gmfl.downlink", "push"], "gmfl.downlink", "'stateless', 'stateful_sync'"),
    (["gmfl.selection", "smallest"], "gmfl.selection", "'magnitude', 'random'"),
    (["gmfl.use", "True", *KRSO], "gmfl.use", "False with federate.method 'fedkrso'"),
    (["gmfl.use", "True", "federate.method", "fft"], "gmfl.use", "False with federate.method 'fft'"),
    (["gmfl.use", "True", "gmfl.downlink", "stateful_sync", *HAFL], "gmfl.downlink",
     "'stateless' with federate.method 'hafl'"),
    # hafl
    ([*HAFL, "hafl.scheme", "sliced"], "hafl.scheme", "'truncation', 'freezing'"),
    ([*HAFL, "hafl.beta1", "1.0"], "hafl.beta1", "(0.0, 1.0)"),
    ([*HAFL, "hafl.aggregation", "zero_padding", "hafl.norm_scope", "rank1"], "hafl.norm_scope",
     "'uploaded' or 'full' with aggregation 'zero_padding'"),
    ([*HAFL, "hafl.scheme", "truncation", "hafl.profiles", "[{share: 1.0, freeze_ratio: 0.5}]"],
     "hafl.profiles[0].rank", "a rank (and no freeze_ratio)"),
    ([*HAFL, "hafl.scheme", "truncation", "hafl.profiles", "[{share: 1.0, rank: 16}]"], "hafl.profiles[0].rank",
     "[1, r_max] with r_max = llm.adapter.args[0].r = 8"),
    ([*HAFL, "hafl.profiles", "[{share: 0.5, freeze_ratio: 0.5}]"], "hafl.profiles[0].share", "summing to 1"),
    ([*HAFL, "hafl.profiles", "[{clients: [0, 7], freeze_ratio: 0.5}]"], "hafl.profiles[0].clients",
     "ids in [0, 1]"),
    ([*HAFL, "hafl.aggregation", "fedavg", "hafl.profiles", "[{share: 1.0, freeze_ratio: 0.5}]"],
     "hafl.aggregation", "'adaptive' or 'zero_padding' when a profile trains fewer"),
    ([*HAFL, "hafl.profile", "[]"], "hafl.profile", "did you mean 'hafl.profiles'"),
    # fedkrso
    ([*KRSO, "fedkrso.num_seeds", "0"], "fedkrso.num_seeds", "[1, 65536]"),
    ([*KRSO, "fedkrso.num_seeds", "4", "fedkrso.seed_bits", "2"], "fedkrso.seed_bits", "at least 3"),
    ([*KRSO, "fedkrso.state_policy", "keep"], "fedkrso.state_policy", "'reset', 'reset_moments', 'transform'"),
    ([*KRSO, "fedkrso.rank", "0"], "fedkrso.rank", "[1, inf)"),
    ([*KRSO, "fedkrso.target_modules", "[nonexistent]"], "fedkrso.target_modules", "'nonexistent' matches none"),
    # fft
    (["federate.method", "fft", "fft.target_modules", "[nonexistent]"], "fft.target_modules",
     "'nonexistent' matches none"),
    (["federate.method", "fft", "fft.lr", "1"], "fft.lr", "known keys under 'fft': target_modules"),
    # fedhft
    ([*HFT, "fedhft.levels", "{keep_ratio: [0.5, 0.25], client_share: [1.0]}"], "fedhft.levels.client_share",
     "one share per level"),
    ([*HFT, "fedhft.levels", "{keep_ratio: [0.5, 0.25], client_share: [0.7, 0.7]}"], "fedhft.levels.client_share",
     "shares summing to 1"),
    ([*HFT, "fedhft.levels", "{keep_ratio: [0.0], client_share: [1.0]}"], "fedhft.levels.keep_ratio", "(0.0, 1.0]"),
    ([*HFT, "fedhft.premask", "True", "fedhft.mask_score", "fisher"], "fedhft.premask",
     "False with mask_score 'fisher'"),
    (["federate.method", "fedhft", "fedhft.eval", "personalised"], "fedhft.eval",
     "'global' unless data.client_val_fraction > 0"),
    ([*HFT, "fedhft.num_clusters", "5"], "fedhft.num_clusters", "at most the clients per round (2)"),
    ([*HFT, "fedhft.svd", "qr"], "fedhft.svd", "'randomized', 'exact'"),
    # faults (embedded simulator)
    (["faults.dropout_before", "1.5"], "faults.dropout_before", "[0.0, 1.0]"),
    (["faults.deadline", "0.5"], "faults.deadline", "at least faults.client_seconds (1.0)"),
    (["faults.straggler_fraction", "0.2"], "faults.straggler_delay", "a number > 0 when faults.straggler_fraction"),
    (["faults.nan_clients", "[0, 7]"], "faults.nan_clients", "client ids in [0, 1] (federate.client_num = 2)"),
    (["federate.max_rejected_rounds", "-1"], "federate.max_rejected_rounds", "[0, inf)"),
    # a task the backbone cannot do (issue 28): causal LM on an encoder-only backbone
    (["model.task", "causal_lm"], "model.type",
     "a decoder (causal-LM) backbone with model.task 'causal_lm' (tiny_gpt2, tiny_llama, smollm2"),
    # missing data paths and unknown datasets / backbones
    (["data.type", "jsonl:/nonexistent/x.jsonl"], "data.type", "an existing JSONL file"),
    (["data.type", "imdb"], "data.type", "csv:<path>, jsonl:<path>"),
    (["model.type", "/no/such/model"], "model.type", "a local model directory containing config.json"),
    # backbones without the target modules, for every adapter method
    (["llm.adapter.args", "[{target_modules: [q_proj]}]"], "llm.adapter.args[0].target_modules",
     "'q_proj' does not exist"),
    (["model.type", "tiny_gpt2", "llm.adapter.args", "[{target_modules: [query]}]"],
     "llm.adapter.args[0].target_modules", "'query' does not exist (linear modules: c_attn"),
    ([*HFT, "llm.adapter.args", "[{target_modules: [nope]}]"], "llm.adapter.args[0].target_modules",
     "'nope' does not exist"),
    ([*HAFL, "llm.adapter.args", "[{target_modules: [nope]}]"], "llm.adapter.args[0].target_modules",
     "'nope' does not exist"),
]


def _ids() -> list[str]:
    return [f"{i:02d}-{key}" for i, (_, key, _) in enumerate(TABLE)]


@pytest.mark.parametrize("overrides,key,fragment", TABLE, ids=_ids())
def test_bad_config_row_exits_2_with_one_line(overrides, key, fragment, tmp_path, capsys):
    """The row's bad setting: exit code 2 and a single stderr line naming the key, the value and what is allowed."""
    code = main(["run", "--cfg", "/dev/null", "--quiet", *BASE, "outdir", str(tmp_path), *overrides])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("fs-gmfl: error:")
    assert f"'{key}'" in lines[0]
    assert fragment in lines[0]
    assert not list(tmp_path.rglob("summary.json"))  # nothing ran


def test_table_covers_every_section_and_method_subtree():
    """The table spans the FederatedScope sections and all five method subtrees."""
    sections = {key.split(".")[0].split("[")[0] for _, key, _ in TABLE}
    assert {"federate", "data", "model", "llm", "train", "eval", "dataloader", "grad"} <= sections
    assert {"gmfl", "hafl", "fedkrso", "fft", "fedhft", "faults"} <= sections
    assert len(TABLE) >= 25


@pytest.mark.parametrize("overrides,fragment", [
    ([*KRSO, "fedkrso.target_modules", "[nonexistent]"], "'nonexistent' matches none"),
    (["data.type", "jsonl:/nonexistent/x.jsonl"], "an existing JSONL file"),
    ([*HAFL, "hafl.profiles", "[{share: 0.5, freeze_ratio: 0.5}]"], "summing to 1"),
])
def test_bad_config_subprocess_exit_status_and_no_traceback(overrides, fragment, tmp_path):
    """As a real process: exit status 2, one stderr line, no traceback."""
    result = subprocess.run([sys.executable, "-m", "fs_gmfl", "run", "--cfg", "/dev/null", "--quiet", *BASE,
                             "outdir", str(tmp_path), *overrides], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("fs-gmfl: error:"), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr
