"""One client's local training, measured in a fresh process: step time, peak resident memory, trained bytes.

Used by ``fs-gmfl bench hafl --profile-cost`` (per HAFL profile) and
``fs-gmfl bench perf --blocks llm`` (per method on SmolLM2).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from fs_gmfl.config import RunConfig
from fs_gmfl.core.adapter import adapter_state
from fs_gmfl.hosts.common.data import federated_data_for
from fs_gmfl.hosts.common.models import AdapterVariants, build_backbone, load_tokenizer
from fs_gmfl.hosts.sim.training import train_local
from fs_gmfl.methods import MethodContext, build_method


def tensor_bytes(tensors: Any) -> int:
    """Bytes of every tensor in ``tensors`` (a tensor, or nested dicts / lists / tuples of them)."""
    import torch

    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(tensor_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(v) for v in tensors)
    return 0


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in KiB; 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current resident size (Linux ``clear_refs`` 5); ``False``: not reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def measure_client_cost(cfg: RunConfig, warmup: int) -> dict[str, Any]:
    """Client 0's local training under ``cfg`` (batch mode), measured in this (fresh) process.

    Runs ``cfg.train.local_update_steps`` batch steps of client 0 from a real
    round-1 downlink and returns the steps after the first ``warmup`` (seconds),
    the resident memory before training and at its peak during training
    (``VmHWM``, reset after loading the model and the data where the kernel
    allows; else the whole process's), the peak of the loading itself, and the
    bytes of the trained parameter tensors and of the optimizer state (the
    gradients, freed after each step, take the parameters' bytes).
    """
    from fs_gmfl.hosts.common.threads import set_torch_threads

    threads = set_torch_threads()
    data = federated_data_for(cfg, load_tokenizer(cfg))
    backbone = build_backbone(cfg, data.num_labels)
    variants = AdapterVariants(backbone.model, cfg, backbone.target_modules)
    m = build_method(MethodContext(cfg, adapter_state(backbone.model), variants, model=backbone.model))
    plan = m.client.prepare(backbone.model, m.strategy.configure_round(1, [0])[0].detached_copy(), {})
    seen: dict[str, Any] = {}
    hook = plan.on_optimizer

    def keep(optimizer: Any) -> None:
        seen["optimizer"] = optimizer
        if hook is not None:
            hook(optimizer)

    plan.on_optimizer = keep
    client_data = data.client_data(0)
    loading_peak, rss_before = status_kib("VmHWM"), status_kib("VmRSS")
    reset = reset_peak_rss()
    stats = train_local(plan, client_data, cfg, rnd=1, client_id=0)
    trained = sum(int(plan.grad_masks[k].sum()) if k in plan.grad_masks else p.numel()
                  for k, p in plan.trainable.items())
    optimizer = seen.get("optimizer")
    return {"threads": threads, "step_seconds": stats.step_seconds[warmup:], "steps_warmup": warmup,
            "loading_peak_rss_bytes": loading_peak * 1024, "rss_before_training_bytes": rss_before * 1024,
            "peak_rss_bytes": status_kib("VmHWM") * 1024, "peak_rss_reset_before_training": reset,
            "trainable_params": sum(p.numel() for p in plan.trainable.values()), "trained_params": trained,
            "param_bytes": tensor_bytes(list(plan.trainable.values())),
            "optimizer_state_bytes": tensor_bytes(list(optimizer.state.values())) if optimizer is not None else 0,
            "loadavg_1min": os.getloadavg()[0]}


def in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a spawned child (so its memory is its own), with the median, min and max step seconds."""
    start = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        row = pool.submit(fn, *args).result()
    steps = row["step_seconds"]
    row.update(median_step_seconds=statistics.median(steps), min_step_seconds=min(steps),
               max_step_seconds=max(steps), child_wall_seconds=time.perf_counter() - start)
    return row
