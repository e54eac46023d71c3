"""FederatedScope config -> RunConfig conversion and one-YAML-two-hosts loading (no FederatedScope needed)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from fs_gmfl.config import load_config
from fs_gmfl.config.loader import strip_host_only
from fs_gmfl.core.gmfl import GMFLConfig
from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.fs.config import is_sim_data, is_sim_model, method_sections, owned_methods, plain, to_run_config
from fs_gmfl.hosts.sim.runner import Simulation

ROOT = Path(__file__).resolve().parents[1]
BOTH_HOSTS = sorted((ROOT / "yaml_configs" / "fs").glob("*_both_hosts.yaml"))

#: the relevant part of a FederatedScope config after its own defaults (values as in the `llm` branch).
FS_DEFAULTS = {
    "seed": 0, "outdir": "exp", "expname": "", "use_gpu": False, "device": -1,
    "federate": {"mode": "standalone", "method": "FedAvg", "client_num": 3, "sample_client_num": 3,
                 "sample_client_rate": -1.0, "total_round_num": 2, "share_local_model": False},
    "data": {"root": "data", "type": "toy", "splits": [0.8, 0.1, 0.1], "splitter": "", "splitter_args": [],
             "subsample": 1.0},
    "model": {"type": "lr", "task": "node", "num_labels": 1, "hidden": 256},
    "llm": {"tok_len": 128, "adapter": {"use": False, "args": [{}], "mv_to_cpu": False}},
    "dataloader": {"batch_size": 64, "shuffle": True, "drop_last": False},
    "train": {"local_update_steps": 1, "batch_or_epoch": "batch", "optimizer": {"type": "SGD", "lr": 0.1},
              "scheduler": {"type": "", "warmup_ratio": 0.0}},
    "grad": {"grad_clip": -1.0, "grad_accum_count": 1},
    "eval": {"freq": 1, "metrics": [], "split": ["test", "val"], "count_flops": True},
    "gmfl": {"use": False},
}


def fs_cfg(**sections):
    """FS_DEFAULTS with sections updated (``federate={"method": "fedit"}``)."""
    cfg = copy.deepcopy(FS_DEFAULTS)
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    return cfg


def native_llm_cfg(**sections):
    """A FederatedScope-LLM run of an fs_gmfl method on FederatedScope's own model and data."""
    base = fs_cfg(federate={"method": "FedIT"}, data={"type": "alpaca.json@llm", "splitter": "meta"},
                  model={"type": "/models/llama@huggingface_llm"},
                  llm={"tok_len": 256, "adapter": {"use": True, "args": [
                      {"adapter_package": "peft", "adapter_method": "lora", "r": 8, "lora_alpha": 16,
                       "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False}]}},
                  train={"optimizer": {"type": "RMSprop", "lr": 0.01}})
    for name, values in sections.items():
        base[name].update(values)
    return base


def test_native_run_keeps_core_keys_and_leaves_fs_only_values_to_fs():
    """Method lower-cased, rank/alpha kept; RMSprop and fan_in_fan_out fall back; 'meta' is kept and FS's unset
    task 'node' resolves to causal_lm for '@llm' instruction data."""
    cfg = to_run_config(native_llm_cfg(gmfl={"use": True, "c": 0.2, "period": 5}))
    assert cfg.federate.method == "fedit" and cfg.federate.client_num == 3
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.target_modules) == (8, 16.0, ["q_proj", "v_proj"])
    assert cfg.gmfl.use and (cfg.gmfl.c, cfg.gmfl.period) == (0.2, 5)
    assert cfg.train.optimizer.type == "AdamW" and cfg.train.optimizer.lr == 0.01  # type unknown to fs_gmfl, lr kept
    assert cfg.data.splitter == "meta" and cfg.model.task == "causal_lm" and cfg.model.num_labels == 0


@pytest.mark.parametrize("section, values, key", [
    ("gmfl", {"use": True, "c": 2.0}, "gmfl.c"),
    ("gmfl", {"use": True, "tie_policy": "coin_flip"}, "gmfl.tie_policy"),
    ("federate", {"sample_client_num": 9}, "federate.sample_client_num"),
    ("llm", {"adapter": {"use": False, "args": [{"r": 8}]}}, "llm.adapter.use"),
    ("llm", {"adapter": {"use": True, "args": [{"r": 0}]}}, "llm.adapter.args[0].r"),
])
def test_core_keys_are_strict(section, values, key):
    """A value the cores cannot use is an error naming the key, never a silent fallback."""
    with pytest.raises(ConfigError) as err:
        to_run_config(native_llm_cfg(**{section: values}))
    assert err.value.key == key


def test_fs_gmfl_data_and_backbone_make_their_sections_strict():
    """With fs_gmfl's own dataset and backbone, data/model/dataloader values must be fs_gmfl's."""
    cfg = fs_cfg(federate={"method": "fedit"}, data={"type": "synthetic", "splitter": "iid"},
                 model={"type": "tiny_bert@fs_gmfl_llm"}, llm={"adapter": {"use": True, "args": [{"r": 4}]}})
    assert to_run_config(cfg).model.task == "seq_cls"  # FederatedScope's unset default 'node' -> fs_gmfl's
    cfg["data"]["splitter"] = "louvain"
    with pytest.raises(ConfigError, match="data.splitter"):
        to_run_config(cfg)


def test_fs_unset_defaults_mean_fs_gmfl_defaults():
    """model.num_labels 1, model.task 'node' and data.splitter '' are FederatedScope's 'not set'."""
    cfg = to_run_config(fs_cfg(federate={"method": "fedit"}, data={"type": "synthetic"},
                               model={"type": "tiny_bert@fs_gmfl_llm"},
                               llm={"adapter": {"use": True, "args": [{"r": 4}]}}))
    assert (cfg.model.num_labels, cfg.model.task, cfg.data.splitter) == (0, "seq_cls", "iid")


def test_plain_drops_federatedscope_bookkeeping_entries():
    """FederatedScope nodes keep check functions and help among their items; they are not config values."""
    node = {"use": True, "c": 0.1, "__cfg_check_funcs__": [print], "__help_info__": {}, "is_ready_for_run": False}
    assert plain(node) == {"use": True, "c": 0.1}


@pytest.mark.parametrize("data_type, expected", [
    ("rotten_tomatoes", True), ("synthetic", True), ("csv:/d/x.csv", True), ("jsonl:/d/x.jsonl", True),
    ("alpaca.json@llm", False), ("gsm8k@llm", False), ("csv:", False), ("toy", False)])
def test_is_sim_data(data_type, expected):
    """fs_gmfl datasets are the simulator's names; FederatedScope's '@llm' data is not one."""
    assert is_sim_data(data_type) is expected


def test_is_sim_model():
    """Only the '@fs_gmfl_llm' hub names fs_gmfl backbones."""
    assert is_sim_model("tiny_bert@fs_gmfl_llm") and is_sim_model("/m/dir@fs_gmfl_llm")
    assert not is_sim_model("tiny_bert") and not is_sim_model("/m/llama@huggingface_llm")


def test_owned_methods_and_sections():
    """fs_gmfl runs its registered methods but not FederatedScope's fedavg; gmfl is a method subtree."""
    assert {"fedit", "ffa_lora"} <= set(owned_methods()) and "fedavg" not in owned_methods()
    assert method_sections()["gmfl"] is GMFLConfig


@pytest.mark.parametrize("path", BOTH_HOSTS, ids=[p.name for p in BOTH_HOSTS])
def test_both_hosts_configs_load_in_the_simulator(path):
    """The one-file-two-hosts configs validate in the simulator (FederatedScope-only keys ignored)."""
    cfg = load_config(path)
    assert cfg.model.type.endswith("@fs_gmfl_llm") and cfg.gmfl.use


def test_host_only_keys_are_removed_with_one_notice(caplog):
    """trainer/eval.count_flops/... are dropped and named once; other unknown keys still fail."""
    data = {"trainer": {"type": "fs_gmfl_llmtrainer"}, "eval": {"count_flops": False, "freq": 2},
            "federate": {"share_local_model": True, "method": "fedit"}}
    with caplog.at_level(logging.WARNING):
        removed = strip_host_only(copy.deepcopy(data)) + strip_host_only(copy.deepcopy(data))
    assert sorted(set(removed)) == ["eval.count_flops", "federate.share_local_model", "trainer"]
    assert sum("FederatedScope-only" in r.message for r in caplog.records) <= 1
    with pytest.raises(ConfigError, match="eval.count_flopz"):
        load_config(None, ["eval.count_flopz", "False"])


def test_both_hosts_tiny_config_runs_in_the_simulator(tmp_path):
    """The tiny two-host config trains in the simulator; GMFL freezes half the tensors after round 1."""
    cfg = load_config(ROOT / "yaml_configs" / "fs" / "gmfl_fedit_tiny_bert_both_hosts.yaml",
                      ["outdir", str(tmp_path)])
    summary = Simulation(cfg, quiet=True).run()
    assert [r["frozen_fraction"] for r in summary["per_round"][1:]] == [0.0, 0.5]
    # 3 clients x ((512 LoRA + 34 head) x 4 B + 8 B) in round 1; 4 of 8 LoRA tensors (256 params) frozen in round 2
    assert [r["uplink_bytes"] for r in summary["per_round"][1:]] == [3 * 2192, 3 * (2192 - 1024)]


@pytest.mark.parametrize("optimizer,half,refused", [
    ({"type": "AdamW", "lr": 1e-4}, True, True),            # torch's default eps 1e-8 is 0 in float16
    ({"type": "Adam", "lr": 1e-4, "eps": 1e-8}, True, True),
    ({"type": "AdamW", "lr": 1e-4, "eps": 1e-6}, True, False),
    ({"type": "SGD", "lr": 1e-2}, True, False),
    ({"type": "AdamW", "lr": 1e-4}, False, False),
])
def test_half_precision_adam_with_an_eps_float16_loses_is_refused(optimizer, half, refused):
    """Issue #28: refused at config time (it trained nothing: every update NaN and rejected), naming the key and
    the alternatives."""
    from fs_gmfl.hosts.fs import config as fs_config

    cfg = {"train": {"is_enable_half": half, "optimizer": optimizer}}
    if not refused:
        fs_config._check_half_adam(cfg)
        return
    with pytest.raises(ConfigError) as err:
        fs_config._check_half_adam(cfg)
    assert err.value.key == "train.optimizer.type" and "SGD" in str(err.value) and "eps >= 6e-08" in str(err.value)
    assert torch.tensor(optimizer.get("eps", 1e-8), dtype=torch.float16).item() == 0.0  # the fact behind it


FS_MISSING = "FederatedScope (branch llm) is not installed: FederatedScope host tests skipped"


@pytest.mark.fs_host
def test_a_model_path_does_not_nest_the_output_directory(tmp_path):
    """Issue #28: FederatedScope's default expname holds model.type, so a model *path* nested the run directory
    along it; for an fs_gmfl method the default keeps FederatedScope's pattern with the last path component."""
    pytest.importorskip("federatedscope", reason=FS_MISSING)
    from fs_host_helpers import FS_CONFIGS, merged_like_main

    from fs_gmfl.hosts.fs import register_all

    register_all()
    cfg = merged_like_main(FS_CONFIGS / "gmfl_fedit_tiny_llama.yaml",
                           ["expname", "", "model.type", "/models/llama-7b@huggingface_llm", "outdir", str(tmp_path)])
    assert cfg.expname == "fedit_llama-7b@huggingface_llm_on_instructions.json@llm_lr0.001_lstep3"
    named = merged_like_main(FS_CONFIGS / "gmfl_fedit_tiny_llama.yaml", ["expname", "mine", "outdir", str(tmp_path)])
    assert named.expname == "mine"


@pytest.mark.fs_host
def test_a_restored_run_into_an_existing_directory_is_warned_about_sub_exp(tmp_path, caplog):
    pytest.importorskip("federatedscope", reason=FS_MISSING)
    from fs_host_helpers import FS_CONFIGS, merged_like_main

    from fs_gmfl.hosts.fs import register_all

    register_all()
    (tmp_path / "mine").mkdir()
    with caplog.at_level("WARNING"):
        merged_like_main(FS_CONFIGS / "gmfl_fedit_tiny_llama.yaml",
                         ["expname", "mine", "outdir", str(tmp_path), "federate.restore_from", str(tmp_path / "x.ckpt")])
    assert "sub_exp_<time>/, whose summary.json lists the rounds after the restore only" in caplog.text
