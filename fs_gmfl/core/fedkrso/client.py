"""FedKRSO client: local training inside random subspaces, with per-seed accumulators.

For each interval of ``J`` optimizer steps the client picks one of the
round's ``K`` seeds; every targeted layer then computes
``y = W x + B (P x)`` with ``W`` and ``P`` frozen and only ``B`` (``d_out x r``,
zero at the interval start) trained, by a forward hook on the plain linear
layer, so the host's optimizer holds Adam moments for ``B`` and the head only.
At the interval end ``B P`` is merged into ``W`` in place (``addmm_``) and
``B`` is added to that seed's accumulator.

What is never materialised: a gradient of a targeted ``W`` (it keeps
``requires_grad=False``), full-size optimizer moments, the dense ``B P``, and
projections of several seeds or (outside the forward pass of one interval)
of all layers at once. During an interval the current seed's ``P`` of every
layer lives as the frozen side-branch weight (the size of LoRA's ``A``
factors), as spec §3 lists.

Synchronisation: a client holds its last synced global weights. It applies
the downlink's catch-up (log replay or full weights) to reach ``W^{t-1}``,
keeps that copy on disk while training (as a device keeps its model file) and
returns to it after building the uplink. The version each model holds is
tracked per model object, so one model shared by all simulated clients is
brought forward by the replay entries it has not applied yet, while a model
per client (FederatedScope) replays everything its client missed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fs_gmfl.core.adapter import adapter_parameters, load_model_tensors
from fs_gmfl.core.fedkrso import wire
from fs_gmfl.core.fedkrso.config import FedKRSOConfig
from fs_gmfl.core.fedkrso.ops import (apply_update_, interval_slot_generator, layer_rank, merge_, next_slot,
                                      projected_decay_grad, projection, transform_moment)
from fs_gmfl.core.message import Message
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, TrainStats
from fs_gmfl.core.targets import TargetLayer, target_modules, target_weights
from fs_gmfl.errors import InputError

B_PREFIX = "krso.B/"
#: attribute of a model holding the global version of its targeted weights.
VERSION_ATTR = "_fs_gmfl_fedkrso_version"


@dataclass
class _Branch:
    """One targeted layer during local training: its frozen ``W``, the current ``P`` and the trained ``B``."""

    layer: TargetLayer
    rank: int
    weight: Tensor
    b: nn.Parameter
    p: Tensor
    handles: list[RemovableHandle] = field(default_factory=list)

    def forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        """Add the subspace branch ``B (P x)`` to the layer's output."""
        return output + F.linear(F.linear(args[0], self.p), self.b)


def exclude_from_weight_decay(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
    """Move ``params`` into parameter groups without weight decay (same other hyper-parameters)."""
    ids = {id(p) for p in params}
    for group in list(optimizer.param_groups):
        if not group.get("weight_decay"):
            continue
        moved = [p for p in group["params"] if id(p) in ids]
        if not moved:
            continue
        if len(moved) == len(group["params"]):
            group["weight_decay"] = 0.0
            continue
        group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                   "weight_decay": 0.0})


#: optimizer-state entries holding moments (Adam/AdamW, AMSGrad, SGD momentum); ``step`` is not one of them.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


@torch.no_grad()
def zero_moments(state: dict[str, Any]) -> None:
    """Zero the moment tensors of one parameter's optimizer state in place, keeping its step counter.

    The authors' interval reset: the next Adam step then sees ``m = v = 0`` but
    bias-corrects with ``1 - beta^t`` at the continued step count ``t``, not at
    ``t = 1`` as after :meth:`dict.clear`.
    """
    for key in MOMENT_KEYS:
        if isinstance(state.get(key), Tensor):
            state[key].zero_()


class SubspaceSession:
    """One client's local training in one round: intervals, merges and accumulators.

    Args:
        branches: one :class:`_Branch` per targeted layer (``B`` zero).
        seeds: the round's seeds.
        schedule_seed: seed of the interval draws.
        config: the ``fedkrso`` configuration.
        weight_decay: ``train.optimizer.weight_decay`` (used by ``projected``).
    """

    def __init__(self, branches: Sequence[_Branch], seeds: Sequence[int], schedule_seed: int,
                 config: FedKRSOConfig, weight_decay: float) -> None:
        self.branches = list(branches)
        self.seeds = list(seeds)
        self.config = config
        self.weight_decay = weight_decay
        self.generator = interval_slot_generator(schedule_seed)
        self.accumulators: dict[int, dict[str, Tensor]] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.slot = next_slot(self.generator, len(self.seeds))
        self.steps_in_interval = 0
        self.slot_history: list[int] = []
        for branch in self.branches:
            branch.p = self._projection(branch)

    def _projection(self, branch: _Branch) -> Tensor:
        return projection(self.seeds[self.slot], branch.layer.key, rank=branch.rank, d_in=branch.layer.d_in,
                          dtype=branch.weight.dtype, device=branch.weight.device, basis=self.config.basis)

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the host's optimizer (for state resets) and exempt ``B`` from decoupled weight decay."""
        self.optimizer = optimizer
        exclude_from_weight_decay(optimizer, [b.b for b in self.branches])

    def after_step(self, step: int) -> None:
        """Count an applied step; close the interval after ``J`` of them and open the next."""
        self.steps_in_interval += 1
        if self.steps_in_interval >= self.config.interval:
            self.end_interval()
            self.start_interval()

    @torch.no_grad()
    def end_interval(self) -> None:
        """``W += B P`` and ``Acc[slot] += B`` for every layer; ``B <- 0``."""
        if self.steps_in_interval == 0:
            return
        acc = self.accumulators.setdefault(self.slot, {})
        for branch in self.branches:
            merge_(branch.weight, branch.b, branch.p, transposed=branch.layer.transposed)
            name = branch.layer.name
            acc[name] = acc[name].add_(branch.b) if name in acc else branch.b.detach().clone()
            branch.b.zero_()
        self.slot_history.append(self.slot)
        self.steps_in_interval = 0

    @torch.no_grad()
    def start_interval(self) -> None:
        """Draw the next seed, regenerate each layer's ``P`` and reset or transform ``B``'s optimizer state."""
        self.slot = next_slot(self.generator, len(self.seeds))
        for branch in self.branches:
            p_new = self._projection(branch)
            state = self.optimizer.state.get(branch.b) if self.optimizer is not None else None
            if state:
                if self.config.state_policy == "reset":
                    state.clear()
                elif self.config.state_policy == "reset_moments":
                    zero_moments(state)
                else:
                    for key in ("exp_avg", "momentum_buffer"):
                        if isinstance(state.get(key), Tensor):
                            state[key].copy_(transform_moment(state[key], branch.p, p_new))
            branch.p = p_new

    def decay_hook(self, branch: _Branch) -> Callable[[Tensor], Tensor]:
        """Gradient hook of ``B`` adding the projected weight-decay term."""
        def hook(grad: Tensor) -> Tensor:
            return grad + projected_decay_grad(branch.weight, branch.b.detach(), branch.p,
                                               strength=self.weight_decay, transposed=branch.layer.transposed)
        return hook


class FedKRSOClient(ClientAlgorithm):
    """Client side of FedKRSO.

    Args:
        config: the ``fedkrso`` configuration.
        layers: the targeted layers (as resolved on the host's model).
        head_keys: adapter keys of the head trained and averaged normally.
        weight_decay: ``train.optimizer.weight_decay`` (the head's decoupled
            decay; the strength of ``projected`` subspace decay).
        spill_dir: directory of the temporary synced-weights file (default: the system's).
    """

    def __init__(self, config: FedKRSOConfig, layers: Sequence[TargetLayer], head_keys: Sequence[str], *,
                 weight_decay: float = 0.0, spill_dir: str | None = None) -> None:
        self.config = config
        self.layers = list(layers)
        self.head_keys = list(head_keys)
        self.weight_decay = weight_decay
        self.spill_dir = spill_dir

    @staticmethod
    def model_version(model: nn.Module) -> int:
        """The global version ``model``'s targeted weights hold (0: the initial backbone).

        Kept on the model object itself, so every client algorithm (and a host
        that loads global weights into a shared model) sees the same version.
        """
        return int(getattr(model, VERSION_ATTR, 0))

    @staticmethod
    def set_model_version(model: nn.Module, version: int) -> None:
        """Record that ``model``'s targeted weights now hold global version ``version``."""
        setattr(model, VERSION_ATTR, int(version))

    def host_state_dict(self, model: nn.Module) -> dict[str, Any]:
        """The version the shared model's targeted weights hold and, past the initial one, those weights."""
        version = self.model_version(model)
        weights = target_weights(model, self.layers) if version else {}
        return {"version": version, "weights": {k: w.detach().clone() for k, w in weights.items()}}

    def load_host_state_dict(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Put the targeted weights saved by :meth:`host_state_dict` back into ``model``.

        Version 0 records that the model holds the initial backbone (a host that
        reloaded the initial weights into a model used by another client says so).
        """
        if not state.get("version"):
            self.set_model_version(model, 0)
            return
        weights = target_weights(model, self.layers)
        if set(state["weights"]) != set(weights):
            raise ValueError("checkpoint FedKRSO weights do not match this model's targeted layers")
        with torch.no_grad():
            for name, value in state["weights"].items():
                weights[name].copy_(value)
        self.set_model_version(model, int(state["version"]))

    # -- prepare -----------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """Catch up to the global weights, load the head, install the subspace branches."""
        down = wire.parse_downlink(message, self.layers, num_seeds=self.config.num_seeds, rank=self.config.rank,
                                   head_keys=self.head_keys)
        weights = target_weights(model, self.layers)
        self.catch_up(model, weights, down)
        load_model_tensors(model, down.head)
        spill = self._spill(weights)
        branches = self._branches(model, weights)
        session = SubspaceSession(branches, down.seeds, down.schedule_seed, self.config, self.weight_decay)
        for branch in branches:
            if self.config.subspace_weight_decay == "projected" and self.weight_decay > 0:
                branch.handles.append(branch.b.register_hook(session.decay_hook(branch)))
        params = adapter_parameters(model)
        trainable: dict[str, nn.Parameter] = {B_PREFIX + b.layer.name: b.b for b in branches}
        trainable.update({k: params[k] for k in self.head_keys})
        return LocalPlan(model=model, trainable=trainable, after_step=session.after_step, on_optimizer=session.bind,
                         info={"session": session, "spill": spill})

    def catch_up(self, model: nn.Module, weights: dict[str, nn.Parameter], down: wire.Downlink) -> None:
        """Bring ``model``'s targeted weights to ``down.version``: full weights, or the replay entries it lacks.

        Raises:
            InputError: the replay does not connect to the version the model holds.
        """
        have = self.model_version(model)
        with torch.no_grad():
            if down.full is not None:
                for name, value in down.full.items():
                    weights[name].copy_(value)
            else:
                first = down.version - len(down.replay) + 1
                if not first - 1 <= have <= down.version:
                    raise InputError(f"FedKRSO downlink replays rounds {first}..{down.version} but the model holds "
                                     f"version {have}")
                for entry in down.replay:
                    if entry.round > have:
                        for layer in self.layers:
                            apply_update_(weights[layer.name], entry.tensors[layer.name], entry.seeds, layer=layer,
                                          rank=self.config.rank, basis=self.config.basis)
        self.set_model_version(model, down.version)

    def _branches(self, model: nn.Module, weights: dict[str, nn.Parameter]) -> list[_Branch]:
        modules = target_modules(model, self.layers)
        branches = []
        for layer in self.layers:
            w = weights[layer.name]
            if w.requires_grad:
                w.requires_grad_(False)
            rank = layer_rank(layer, self.config.rank)
            b = nn.Parameter(torch.zeros(layer.d_out, rank, dtype=w.dtype, device=w.device))
            branch = _Branch(layer, rank, w, b, torch.empty(0))
            branch.handles.append(modules[layer.name].register_forward_hook(branch.forward_hook))
            branches.append(branch)
        return branches

    def _spill(self, weights: dict[str, nn.Parameter]) -> str:
        """Write the synced weights to a temporary file (restored in :meth:`finish`)."""
        fd, path = tempfile.mkstemp(prefix="fedkrso-sync-", suffix=".pt", dir=self.spill_dir)
        os.close(fd)
        torch.save({name: w.detach().cpu() for name, w in weights.items()}, path)
        return path

    # -- finish ------------------------------------------------------------------------------------------------
    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """Close the last interval, upload accumulators and head, return the model to the synced weights."""
        session: SubspaceSession = plan.info["session"]
        session.end_interval()
        for branch in session.branches:
            for handle in branch.handles:
                handle.remove()
        weight = session.branches[0].weight
        params = adapter_parameters(plan.model)
        uplink = wire.uplink_message(session.accumulators, self.layers, rank=self.config.rank,
                                     num_seeds=self.config.num_seeds, head={k: params[k] for k in self.head_keys},
                                     num_samples=stats.num_samples, all_slots=self.config.send_all_slots,
                                     dtype=weight.dtype, device=weight.device)
        self._restore(plan.model, plan.info.pop("spill"))
        plan.info["slot_history"] = list(session.slot_history)
        return uplink

    @staticmethod
    def _restore(model: nn.Module, path: str) -> None:
        try:
            saved = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, value in saved.items():
                    params[name].copy_(value)
        finally:
            os.remove(path)
