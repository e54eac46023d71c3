"""``use_gpu``/``device``: which device a run uses, and a CUDA run end to end where CUDA exists."""

from __future__ import annotations

import logging

import pytest
import torch

from fs_gmfl.config import load_config
from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.common.models import choose_device
from fs_gmfl.hosts.sim.runner import Simulation
from tests.test_causal_lm import causal_config

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="CUDA is not available on this machine: the CUDA path runs on a GPU machine")


def fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_cpu_unless_the_gpu_is_asked_for(monkeypatch):
    fake_cuda(monkeypatch, 2)
    assert choose_device(load_config(None, [])) == torch.device("cpu")


@pytest.mark.parametrize("index,expected", [("-1", "cuda:0"), ("1", "cuda:1")])
def test_use_gpu_picks_the_configured_cuda_device(monkeypatch, index, expected):
    fake_cuda(monkeypatch, 2)
    assert choose_device(load_config(None, ["use_gpu", "True", "device", index])) == torch.device(expected)


def test_a_device_index_the_machine_lacks_is_a_config_error(monkeypatch):
    fake_cuda(monkeypatch, 2)
    with pytest.raises(ConfigError, match="device"):
        choose_device(load_config(None, ["use_gpu", "True", "device", "2"]))


def test_use_gpu_without_cuda_runs_on_the_cpu_with_a_warning(monkeypatch, tmp_path, caplog):
    fake_cuda(monkeypatch, 0)
    with caplog.at_level(logging.WARNING):
        summary = Simulation(causal_config(tmp_path, "use_gpu", "True", "federate.total_round_num", "1"),
                             quiet=True).run()
    assert summary["device"] == "cpu"
    assert "CUDA is not available" in caplog.text


@CUDA_SKIP
@pytest.mark.parametrize("precision", [[], ["train.autocast", "bfloat16"], ["train.is_enable_half", "True"],
                                       ["train.autocast", "float16"]], ids=["fp32", "autocast", "bf16", "fp16-scaled"])
def test_a_causal_lm_run_trains_on_cuda(tmp_path, precision):
    sim = Simulation(causal_config(tmp_path, "use_gpu", "True", *precision), quiet=True)
    summary = sim.run()
    assert summary["device"].startswith("cuda")
    assert {p.device.type for p in sim.model.parameters()} == {"cuda"}
    assert summary["rejected_updates"]["total"] == 0
    assert summary["per_round"][-1]["test_token_loss"] != summary["per_round"][0]["test_token_loss"]


# -- float16 autocast with dynamic loss scaling ------------------------------------------------------------------
def test_float16_autocast_without_use_gpu_is_one_config_line():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.autocast", "float16"])
    text = str(info.value)
    assert "train.autocast" in text and "float16" in text and "'bfloat16'" in text and "\n" not in text


@pytest.mark.parametrize("optimizer", ["AdamW", "Adam"])
def test_float16_weights_with_adam_are_refused_naming_bfloat16(optimizer):
    """Issue #28: is_enable_half in float16 with Adam/AdamW trained nothing (eps 1e-8 is 0 in float16, every update
    NaN and rejected, exit 0); now one config line with the alternatives. SGD in float16 and bfloat16 stay allowed."""
    assert torch.tensor(1e-8, dtype=torch.float16).item() == 0.0
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.is_enable_half", "True", "train.half_dtype", "float16",
                           "train.optimizer.type", optimizer])
    assert info.value.key == "train.half_dtype" and "'bfloat16'" in str(info.value) and "SGD" in str(info.value)
    load_config(None, ["train.is_enable_half", "True", "train.half_dtype", "float16", "train.optimizer.type", "SGD"])
    load_config(None, ["train.is_enable_half", "True", "train.optimizer.type", optimizer])


def test_float16_autocast_on_a_machine_without_cuda_stops_before_training(monkeypatch, tmp_path):
    fake_cuda(monkeypatch, 0)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Simulation(causal_config(tmp_path, "use_gpu", "True", "train.autocast", "float16"), quiet=True)


def test_scaled_step_equals_the_plain_step_and_an_overflow_is_skipped():
    """SGD on loss = sum(w * x): the scaled step gives w - lr * x exactly (the scale is a power of two); a loss whose
    scaled gradient overflows float16 leaves w unchanged and halves the scale."""
    from fs_gmfl.hosts.sim.training import backward_and_step

    x = torch.tensor([0.5, -2.0, 3.0])
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    optimizer = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    backward_and_step((w * x).sum(), optimizer, scaler, [w], grad_clip=-1)
    assert torch.equal(w.detach(), torch.tensor([1.0, 1.0, 1.0]) - 0.1 * x)
    before = w.detach().clone()
    backward_and_step((w * x).sum() * torch.tensor(float("inf")), optimizer, scaler, [w], grad_clip=-1)
    assert torch.equal(w.detach(), before) and scaler.get_scale() == 2.0 ** 9
    assert w.grad is None


def test_float16_autocast_training_keeps_fp32_weights(tmp_path):
    """The training loop under float16 autocast with its loss scaler (run on the CPU here, whose autocast also
    supports float16): the loss is finite, trainable weights stay float32 and move."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fs_gmfl.core.protocol import LocalPlan
    from fs_gmfl.hosts.sim.training import loss_scaler, train_local

    cfg = load_config(None, ["use_gpu", "True", "train.autocast", "float16", "train.local_update_steps", "3",
                             "dataloader.batch_size", "2", "train.optimizer.lr", "0.01"])
    assert isinstance(loss_scaler(cfg, "cpu"), torch.amp.GradScaler)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    trainable = {"c_fc": model.transformer.h[0].mlp.c_fc.weight}
    start = trainable["c_fc"].detach().clone()
    from tests.test_eval_speed import ragged

    stats = train_local(LocalPlan(model=model, trainable=trainable), ragged(8, 12, 40, labels="lm"), cfg, rnd=1,
                        client_id=0)
    assert stats.steps == 3 and torch.isfinite(torch.tensor(stats.mean_loss))
    assert trainable["c_fc"].dtype == torch.float32 and not torch.equal(trainable["c_fc"].detach(), start)
