"""Shared fixtures: tiny offline configurations and helpers."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

from fs_gmfl.config import RunConfig, load_config  # noqa: E402

TINY = [
    "model.type", "tiny_bert", "model.hidden_size", "16", "model.num_heads", "2", "model.vocab_size", "200",
    "data.type", "synthetic", "data.synthetic_num_samples", "160", "llm.tok_len", "16",
    "federate.client_num", "4", "federate.sample_client_num", "2", "federate.total_round_num", "4",
    "train.local_update_steps", "3", "dataloader.batch_size", "8", "llm.adapter.args", "[{r: 4, lora_alpha: 8}]",
    "eval.freq", "2",
]


def tiny_config(tmp_path: os.PathLike[str] | str, *overrides: str) -> RunConfig:
    """A tiny synthetic run configuration writing under ``tmp_path``."""
    return load_config(None, [*TINY, "outdir", str(tmp_path), *overrides])


@pytest.fixture
def tiny(tmp_path):
    """Factory: ``tiny(*overrides) -> RunConfig``."""
    return lambda *overrides: tiny_config(tmp_path, *overrides)


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture
def single_thread(monkeypatch):
    """Run torch (and the simulator, via FS_GMFL_THREADS) on one thread, then restore the thread count.

    Tiny models are dominated by per-op thread synchronisation; on a shared CPU one thread is several times faster.
    """
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("FS_GMFL_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
