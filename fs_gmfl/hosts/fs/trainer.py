"""The fs_gmfl trainer: FederatedScope's ``LLMTrainer`` running a :class:`~fs_gmfl.core.protocol.LocalPlan`.

Behaviour is added only through hooks (FederatedScope's training loop,
forward, backward, clipping and optimizer step stay its own):

=================  ==============================================  =================================================
trigger            hook                                            what it does
=================  ==============================================  =================================================
on_fit_start       ``_hook_on_fit_start_plan`` (after init)        ``client.prepare`` the downlink; ``requires_grad``
                                                                   on exactly ``plan.trainable`` (every other
                                                                   parameter off); optimizer rebuilt over them
                                                                   (``plan.on_optimizer``), scheduler; gradient-mask
                                                                   tensor hooks; FedKRSO-style clipping of tensors
                                                                   outside the model; dropout seed; the round's
                                                                   batch schedule
on_batch_start     ``_hook_on_batch_start_timer`` (first)          step timer
on_batch_forward   ``_hook_on_batch_forward_plan`` (after forward) the plan's extra loss term; a non-finite
                                                                   loss or nothing to train skips the batch
on_batch_forward   ``_hook_on_batch_forward_regularizer`` (own)    FederatedScope's regulariser, left out when the
                                                                   plan has an extra loss
on_batch_backward  ``_hook_on_batch_backward_plan`` (last)         restore ``plan.frozen_values``; ``plan.after_step``
on_batch_end       ``_hook_on_batch_end_record`` (last)            loss and step time of the batch
on_fit_end         ``_hook_on_fit_end_finish`` (first)             remove tensor hooks, restore ``requires_grad``
                                                                   (FederatedScope's state dict keeps every tensor),
                                                                   ``client.finish`` -> the uplink
=================  ==============================================  =================================================

Evaluation gains ``{split}_acc`` for sequence-classification backbones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from federatedscope.core.auxiliaries.optimizer_builder import get_optimizer
from federatedscope.core.auxiliaries.scheduler_builder import get_scheduler
from federatedscope.core.trainers.context import CtxVar
from federatedscope.core.trainers.enums import LIFECYCLE
from federatedscope.llm.model.adapter_builder import AdapterModel
from federatedscope.llm.trainer.trainer import LLMTrainer
from torch import nn

from fs_gmfl.core.adapter import load_model_tensors
from fs_gmfl.core.message import Message
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, TrainStats
from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.errors import InputError
from fs_gmfl.hosts.fs import wire

logger = logging.getLogger("federatedscope." + __name__)


def inner_model(model: nn.Module) -> nn.Module:
    """The peft model inside FederatedScope's ``AdapterModel`` wrapper (adapter keys refer to it)."""
    return model.model if isinstance(model, AdapterModel) else model


@dataclass
class Assignment:
    """One round of local training handed to the trainer by the client worker."""

    algorithm: ClientAlgorithm
    downlink: Message
    client_id: int
    rnd: int
    client_state: MutableMapping[str, Any]
    seed: int


@dataclass
class FitState:
    """Everything one training routine changes, so :meth:`FsGmflTrainer._hook_on_fit_end_finish` can undo it."""

    assignment: Assignment
    plan: LocalPlan
    saved_flags: dict[str, bool]
    default_model: nn.Module
    grad_clip: Any = None
    tensor_hooks: list[Any] = field(default_factory=list)
    batch: int = 0
    started: float = 0.0
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


class FsGmflTrainer(LLMTrainer):
    """``LLMTrainer`` that trains what an fs_gmfl client algorithm plans and returns its uplink."""

    def __init__(self, model: nn.Module, data: Any, device: Any, config: Any, only_for_eval: bool = False,
                 monitor: Any = None) -> None:
        super().__init__(model, data, device, config, only_for_eval, monitor)
        self._assignment: Assignment | None = None
        self._uplink: Message | None = None
        if not only_for_eval:
            self._register_plan_hooks()
        self.register_hook_in_eval(self._hook_on_fit_start_accuracy, "on_fit_start")
        self.register_hook_in_eval(self._hook_on_batch_end_accuracy, "on_batch_end")
        self.register_hook_in_eval(self._hook_on_fit_end_accuracy, "on_fit_end")

    def _register_plan_hooks(self) -> None:
        after_init = self.hooks_in_train["on_fit_start"].index(self._hook_on_fit_start_init) + 1
        self.register_hook_in_train(self._hook_on_fit_start_plan, "on_fit_start", insert_pos=after_init)
        self.register_hook_in_train(self._hook_on_batch_start_timer, "on_batch_start", insert_pos=0)
        after_forward = self.hooks_in_train["on_batch_forward"].index(self._hook_on_batch_forward) + 1
        self.register_hook_in_train(self._hook_on_batch_forward_plan, "on_batch_forward", insert_pos=after_forward)
        self.register_hook_in_train(self._hook_on_batch_backward_plan, "on_batch_backward", insert_pos=-1)
        self.register_hook_in_train(self._hook_on_batch_end_record, "on_batch_end", insert_pos=-1)
        self.register_hook_in_train(self._hook_on_fit_end_finish, "on_fit_end", insert_pos=0)

    # -- the client worker's interface ---------------------------------------------------------
    def assign(self, assignment: Assignment) -> None:
        """Set the downlink the next :meth:`train` call runs."""
        self._assignment = assignment
        self._uplink = None

    def take_uplink(self) -> Message:
        """The uplink built by the last :meth:`train` call (once)."""
        if self._uplink is None:
            raise InputError("local training produced no uplink (was a downlink assigned?)")
        uplink, self._uplink = self._uplink, None
        return uplink

    def update(self, model_parameters: Any, strict: bool = False) -> None:
        """Load an fs_gmfl adapter message (evaluation) or, otherwise, a FederatedScope state dict."""
        if wire.kind_of(model_parameters) is None:
            super().update(model_parameters, strict=strict)
            return
        message = wire.decode(model_parameters, expect=wire.ADAPTER)
        load_model_tensors(inner_model(self.ctx.model), message.tensors)

    # -- training hooks ------------------------------------------------------------------------
    def _hook_on_fit_start_plan(self, ctx: Any) -> None:
        """Prepare the plan and make the optimizer cover exactly its tensors.

        ==========================  ==========================================
        ``ctx`` attribute           operation
        ==========================  ==========================================
        ``ctx.model``               the plan's model if it differs
        ``ctx.optimizer``           rebuilt over ``plan.trainable``
        ``ctx.scheduler``           rebuilt for the new optimizer
        ``ctx.fs_gmfl_fit``         :class:`FitState` (routine lifecycle)
        ==========================  ==========================================
        """
        if self._assignment is None:
            raise InputError("fs_gmfl trainer started without a downlink; use an fs_gmfl client worker")
        job, self._assignment = self._assignment, None
        default = ctx.model
        plan = job.algorithm.prepare(inner_model(default), job.downlink, job.client_state)
        if plan.model is not inner_model(default):
            ctx.model = AdapterModel(plan.model.to(ctx.device))
        params = dict(plan.model.named_parameters())
        fit = FitState(job, plan, {k: p.requires_grad for k, p in params.items()}, default, grad_clip=ctx.grad_clip)
        planned = {id(p) for p in plan.trainable.values()}
        for p in params.values():
            p.requires_grad_(id(p) in planned)
        for p in plan.trainable.values():
            p.requires_grad_(True)
        fit.tensor_hooks = [plan.trainable[k].register_hook(lambda g, m=m: g * m.to(g.device, g.dtype))
                            for k, m in plan.grad_masks.items()]
        if plan.trainable:
            ctx.optimizer, ctx.scheduler = self._optimizer_for(ctx, plan)
            self._clip_planned_tensors(ctx, plan, planned - {id(p) for p in params.values()})
        torch.manual_seed(derive_seed(job.seed, "dropout", job.rnd, job.client_id))
        _start_round_schedule(ctx, job.rnd)
        ctx.fs_gmfl_fit = CtxVar(fit, LIFECYCLE.ROUTINE)

    @staticmethod
    def _optimizer_for(ctx: Any, plan: LocalPlan) -> tuple[Any, Any]:
        """The optimizer over ``plan.trainable`` (handed to ``plan.on_optimizer``), then its scheduler."""
        optimizer = get_optimizer(list(plan.trainable.values()), **ctx.cfg.train.optimizer)
        if plan.on_optimizer is not None:
            plan.on_optimizer(optimizer)  # may regroup parameters: before the scheduler reads the groups
        return optimizer, get_scheduler(optimizer, **ctx.cfg.train.scheduler)

    @staticmethod
    def _clip_planned_tensors(ctx: Any, plan: LocalPlan, outside: set[int]) -> None:
        """With ``grad.grad_clip`` and planned tensors outside the model (FedKRSO's ``B``): clip the plan's tensors.

        FederatedScope clips ``ctx.model.parameters()``, which would miss
        them; its clipping is switched off for the routine (restored at fit
        end) and an optimizer step pre-hook clips ``plan.trainable``, as the
        simulator does.
        """
        clip = ctx.grad_clip
        if not outside or clip is None or clip <= 0:
            return
        ctx.grad_clip = -1.0
        tensors = list(plan.trainable.values())
        ctx.optimizer.register_step_pre_hook(lambda *_: torch.nn.utils.clip_grad_norm_(tensors, clip))

    def _hook_on_batch_start_timer(self, ctx: Any) -> None:
        """Start the step timer (``ctx.fs_gmfl_fit.started``)."""
        ctx.fs_gmfl_fit.started = time.perf_counter()

    def _hook_on_batch_forward_plan(self, ctx: Any) -> None:
        """Add the plan's extra loss term; skip the batch on a non-finite loss or when nothing is trained.

        Runs before FederatedScope's regulariser hook, so ``ctx.loss_task`` (what it backpropagates) includes the
        term, and so does the recorded loss, as in the simulator.

        ==========================  ==========================================
        ``ctx`` attribute           operation
        ==========================  ==========================================
        ``ctx.loss_batch``          plus ``plan.extra_loss(model)`` if set
        ``ctx.skip_this_batch``     True for a non-finite loss / empty plan
        ==========================  ==========================================
        """
        plan = ctx.fs_gmfl_fit.plan
        if plan.extra_loss is not None and plan.trainable:
            ctx.loss_batch = CtxVar(plan.total_loss(ctx.loss_batch), LIFECYCLE.BATCH)
        if not plan.trainable or not bool(torch.isfinite(ctx.loss_batch)):
            ctx.skip_this_batch = CtxVar(True, LIFECYCLE.BATCH)

    def _hook_on_batch_forward_regularizer(self, ctx: Any) -> None:
        """FederatedScope's regulariser term, unless the plan brings its own (``plan.extra_loss``).

        A plan's extra loss is the method's regulariser (FedProx's proximal term), so FederatedScope's plug-in of
        the same name (``fedprox.use``, which the FedProx method switches on to keep ``fedprox.mu``) adds nothing.

        ==========================  ==========================================
        ``ctx`` attribute           operation
        ==========================  ==========================================
        ``ctx.loss_regular``        0 with an extra loss, else FederatedScope's
        ``ctx.loss_task``           ``ctx.loss_batch`` (+ ``ctx.loss_regular``)
        ==========================  ==========================================
        """
        fit = ctx.get("fs_gmfl_fit")
        if fit is None or fit.plan.extra_loss is None:
            super()._hook_on_batch_forward_regularizer(ctx)
            return
        ctx.loss_regular = CtxVar(0.0, LIFECYCLE.BATCH)
        ctx.loss_task = CtxVar(ctx.loss_batch, LIFECYCLE.BATCH)

    def _hook_on_batch_backward_plan(self, ctx: Any) -> None:
        """After the optimizer step: restore frozen entries exactly, then call ``plan.after_step``."""
        if ctx.skip_this_batch:
            return
        fit = ctx.fs_gmfl_fit
        fit.plan.restore_frozen_values()
        if fit.plan.after_step is not None:
            fit.plan.after_step(fit.batch)

    def _hook_on_batch_end_record(self, ctx: Any) -> None:
        """Record the loss and time of a trained batch; advance the batch index."""
        fit = ctx.fs_gmfl_fit
        if not ctx.skip_this_batch:
            fit.losses.append(float(ctx.loss_batch.detach()))
            fit.times.append(time.perf_counter() - fit.started)
        fit.batch += 1

    def _hook_on_fit_end_finish(self, ctx: Any) -> None:
        """Undo what the plan hook changed and build the uplink (``client.finish``).

        ==========================  ==========================================
        ``ctx`` attribute           operation
        ==========================  ==========================================
        ``ctx.model``               back to the default model
        parameters' requires_grad   restored (so FederatedScope's state dict
                                    still carries every adapter tensor)
        ``ctx.grad_clip``           restored
        ==========================  ==========================================
        """
        fit: FitState = ctx.fs_gmfl_fit
        for handle in fit.tensor_hooks:
            handle.remove()
        for key, p in fit.plan.model.named_parameters():
            p.requires_grad_(fit.saved_flags[key])
        ctx.grad_clip = fit.grad_clip
        ctx.model = fit.default_model
        losses = fit.losses
        stats = TrainStats(num_samples=int(ctx.num_train_data), steps=len(losses),
                           mean_loss=sum(losses) / len(losses) if losses else float("nan"), step_seconds=fit.times)
        job = fit.assignment
        self._uplink = job.algorithm.finish(fit.plan, stats, job.client_state)

    # -- evaluation hooks (accuracy of classification backbones) -------------------------------
    def _hook_on_fit_start_accuracy(self, ctx: Any) -> None:
        """Reset the correct/total counters (``ctx.fs_gmfl_correct``, ``ctx.fs_gmfl_count``)."""
        ctx.fs_gmfl_correct = CtxVar(0, LIFECYCLE.ROUTINE)
        ctx.fs_gmfl_count = CtxVar(0, LIFECYCLE.ROUTINE)

    def _hook_on_batch_end_accuracy(self, ctx: Any) -> None:
        """Count correct predictions when logits are ``(batch, classes)`` and labels ``(batch,)``."""
        logits, labels = ctx.get("y_prob"), ctx.get("y_true")
        if ctx.get("skip_this_batch") or logits is None or logits.dim() != 2 or labels.dim() != 1:
            return
        ctx.fs_gmfl_correct += int((logits.argmax(dim=-1) == labels.to(logits.device)).sum())
        ctx.fs_gmfl_count += int(labels.numel())

    def _hook_on_fit_end_accuracy(self, ctx: Any) -> None:
        """Add ``{split}_acc`` to ``ctx.eval_metrics`` for classification backbones."""
        if ctx.fs_gmfl_count:
            ctx.eval_metrics[f"{ctx.cur_split}_acc"] = ctx.fs_gmfl_correct / ctx.fs_gmfl_count


def _start_round_schedule(ctx: Any, rnd: int) -> None:
    """Tell an fs_gmfl batch sampler (fs_gmfl datasets only) which round's batch schedule to play."""
    loader = ctx.get("train_loader")
    loader = getattr(loader, "loader", loader)  # FederatedScope wraps loaders in a ReIterator
    sampler = getattr(loader, "batch_sampler", None)
    if hasattr(sampler, "start_round"):
        sampler.start_round(rnd)
