"""Local training and evaluation loops of the embedded simulator.

:func:`train_local` runs what a :class:`~fs_gmfl.core.protocol.LocalPlan`
describes: only the plan's tensors get ``requires_grad`` and optimiser state,
the plan's extra loss term is added to every batch's loss, gradient masks are
applied through tensor hooks, and masked entries are restored after every
step so decoupled weight decay cannot move them.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fs_gmfl.config.schema import OptimizerConfig, RunConfig, SchedulerConfig
from fs_gmfl.core.adapter import adapter_parameters
from fs_gmfl.core.protocol import LocalPlan, TrainStats
from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.hosts.common.batches import batch_schedule, count_batches
from fs_gmfl.hosts.common.corpus import Encoded
from fs_gmfl.hosts.common.llm_eval import length_sorted_batches


def make_optimizer(cfg: OptimizerConfig, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The local optimizer of ``train.optimizer`` over ``params``."""
    wd = cfg.weight_decay
    if cfg.type == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd)
    cls = torch.optim.AdamW if cfg.type == "AdamW" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=wd)


def round_lr(cfg: RunConfig, rnd: int) -> float:
    """Learning rate of round ``rnd``; ``cosine_rounds`` is the GMFL reference schedule.

    ``lr_r = min_lr + (lr - min_lr) * (1 + cos(pi * (r - 1) / R)) / 2``.
    """
    lr = cfg.train.optimizer.lr
    sched = cfg.train.scheduler
    if sched.type != "cosine_rounds":
        return lr
    total = cfg.federate.total_round_num
    return sched.min_lr + 0.5 * (lr - sched.min_lr) * (1 + math.cos(math.pi * (rnd - 1) / total))


def step_lr_factor(step: int, total: int, sched: SchedulerConfig, base_lr: float) -> float:
    """Multiplier of the learning rate at ``step`` for ``cosine_steps`` (linear warm-up, cosine decay)."""
    if sched.type != "cosine_steps" or total <= 1:
        return 1.0
    warm = int(sched.warmup_ratio * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = sched.min_lr / base_lr if base_lr > 0 else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _set_trainable(plan: LocalPlan) -> None:
    for key, p in adapter_parameters(plan.model).items():
        p.requires_grad_(key in plan.trainable)
    for p in plan.trainable.values():
        p.requires_grad_(True)


def loss_scaler(cfg: RunConfig, device: torch.device | str) -> torch.amp.GradScaler | None:
    """Dynamic loss scaling for ``train.autocast: float16`` (float16 gradients underflow without it), else None."""
    if cfg.train.autocast != "float16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def autocast_context(cfg: RunConfig, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``train.autocast``: bf16 or fp16 autocast of the forward pass (weights and optimizer state stay fp32)."""
    if cfg.train.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, cfg.train.autocast))


def backward_and_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                      params: list[nn.Parameter], grad_clip: float) -> None:
    """Backward pass, optional clipping and the optimizer step; with a loss scaler, the gradients are unscaled
    before clipping and a step whose gradients overflowed is skipped (the scale then shrinks)."""
    if scaler is None:
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_local(plan: LocalPlan, data: Encoded, cfg: RunConfig, *, rnd: int, client_id: int,
                device: torch.device | str = "cpu") -> TrainStats:
    """Run local training as ``plan`` describes and report samples, steps, loss and step times.

    A plan with nothing to train skips training (the client still reports
    its sample count).
    """
    n = len(data)
    if not plan.trainable or n == 0:
        return TrainStats(num_samples=n, steps=0, mean_loss=float("nan"))
    _set_trainable(plan)
    torch.manual_seed(derive_seed(cfg.seed, "dropout", rnd, client_id))
    lr = round_lr(cfg, rnd)
    optimizer = make_optimizer(cfg.train.optimizer, list(plan.trainable.values()), lr)
    if plan.on_optimizer is not None:
        plan.on_optimizer(optimizer)
    hooks = [plan.trainable[k].register_hook(lambda g, m=m: g * m) for k, m in plan.grad_masks.items()]
    total = count_batches(n, cfg)
    scaler = loss_scaler(cfg, device)
    losses, times = [], []
    plan.model.train()
    try:
        for step, index in enumerate(batch_schedule(n, cfg, rnd=rnd, client_id=client_id)):
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr * step_lr_factor(step, total, cfg.train.scheduler, lr)
            batch = {k: v.to(device) for k, v in data.batch(index).items()}
            with autocast_context(cfg, device):
                loss = plan.model(**batch).loss
            loss = plan.total_loss(loss)
            if not torch.isfinite(loss):
                continue
            backward_and_step(loss, optimizer, scaler, list(plan.trainable.values()), cfg.grad.grad_clip)
            plan.restore_frozen_values()
            if plan.after_step is not None:
                plan.after_step(step)
            losses.append(float(loss.detach()))
            times.append(time.perf_counter() - start)
    finally:
        for h in hooks:
            h.remove()
    mean = sum(losses) / len(losses) if losses else float("nan")
    return TrainStats(num_samples=n, steps=len(losses), mean_loss=mean, step_seconds=times)


@torch.inference_mode()
def evaluate(model: nn.Module, data: Encoded, *, batch_size: int, task: str,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Accuracy and mean loss (sequence classification) or token loss and perplexity (causal LM).

    Rows are batched by length, longest first (:func:`length_sorted_batches`),
    so each batch is padded only to its own longest row; the metrics are sums
    over rows and do not depend on the order.
    """
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for index in length_sorted_batches(data.attention_mask.sum(dim=1), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(index).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if task == "seq_cls":
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == labels).sum())
            count += int(labels.numel())
        else:
            shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            total_loss += float(F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum"))
            count += int((shift_labels != -100).sum())
    if count == 0:
        return {}
    mean = total_loss / count
    if task == "seq_cls":
        return {"acc": correct / count, "loss": mean}
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0))}
