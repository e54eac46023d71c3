"""``use_gpu``/``device``: which device a run uses, and a CUDA run end to end where CUDA exists."""

from __future__ import annotations

import logging

import pytest
import torch

from fs_gmfl.config import load_config
from fs_gmfl.errors import ConfigError
from fs_gmfl.sim.models import choose_device
from fs_gmfl.sim.runner import Simulation
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
@pytest.mark.parametrize("precision", [[], ["train.autocast", "bfloat16"], ["train.is_enable_half", "True"]],
                         ids=["fp32", "autocast", "bf16"])
def test_a_causal_lm_run_trains_on_cuda(tmp_path, precision):
    sim = Simulation(causal_config(tmp_path, "use_gpu", "True", *precision), quiet=True)
    summary = sim.run()
    assert summary["device"].startswith("cuda")
    assert {p.device.type for p in sim.model.parameters()} == {"cuda"}
    assert summary["rejected_updates"]["total"] == 0
    assert summary["per_round"][-1]["test_token_loss"] != summary["per_round"][0]["test_token_loss"]
