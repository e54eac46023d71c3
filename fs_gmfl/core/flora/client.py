"""FLoRA's client: start from the merged global model, train fresh rank-r_k LoRA modules, upload them.

``prepare`` puts ``W0 + D`` into the base weight of every adapted module of
the model the client trains (the host's shared model, or the host's
rank-r_k model from ``model_provider``), ``D`` being the downlink's or, under
``flora.downlink: stacked``, the client's own brought forward by the
downlink's stacks; it re-initialises the LoRA factors from the round's seed
(``A`` as peft draws it, ``B = 0``) in an adapter of the client's rank and
loads the head; ``finish`` uploads the factors and the head,
puts back the base weights the model held before ``prepare`` and
re-activates the default adapter. With ``B = 0`` the model a client starts
from computes exactly the merged global model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fs_gmfl.core.adapter import adapter_parameters, load_adapter_tensors, model_tensor_map
from fs_gmfl.core.flora.config import FLoRAConfig
from fs_gmfl.core.flora.ops import MergedModule, add_stacked, fresh_factors, merged_weight
from fs_gmfl.core.flora.wire import Downlink, parse_downlink
from fs_gmfl.core.message import NUM_SAMPLES, Message, samples_tensor
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, TrainStats
from fs_gmfl.errors import InputError

DEFAULT_ADAPTER = "default"
#: ``client_state`` entries of ``flora.downlink: stacked``: the client's ``D`` and the round it holds.
DELTA_CACHE = "flora.delta"
SYNCED = "flora.synced"


class FLoRAClient(ClientAlgorithm):
    """Client side of FLoRA.

    Args:
        modules: the adapted modules (:func:`~fs_gmfl.core.flora.ops.merged_modules`).
        base: ``W0`` of every module by weight name (read only).
        head_keys: adapter keys of the head (trained and averaged as in FedIT).
        rank: the configured rank r.
        alpha: the configured ``lora_alpha``.
        config: the ``flora`` section (its scaling).
        init: ``llm.adapter.args[0].init_lora_weights``.
        samples_cap: the reported sample count is ``min(num_samples, samples_cap)`` (``federate.client_weight``).
        model_provider: the host's ``provider(r=..., lora_alpha=...)`` (clients whose rank or alpha differs from
            the configured adapter's); ``provider()`` re-activates the default adapter.
    """

    def __init__(self, modules: Sequence[MergedModule], base: Mapping[str, Tensor], head_keys: Sequence[str], *,
                 rank: int, alpha: float, config: FLoRAConfig, init: str, samples_cap: int | None = None,
                 model_provider: Callable[..., nn.Module] | None = None) -> None:
        self.modules = list(modules)
        self.base = base
        self.head_keys = list(head_keys)
        self.rank, self.alpha, self.config, self.init = rank, alpha, config, init
        self.samples_cap = samples_cap
        self.model_provider = model_provider

    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """Merge ``D`` into the base weights of the model the client trains (the host's, or its rank-r_k model),
        re-initialise rank-r_k LoRA factors, load the head."""
        down = parse_downlink(message, self.modules, self.head_keys, max_rank=self.rank)
        delta = down.delta if down.since is None else self._synced_delta(down, client_state)
        model, adapter = self._local_model(model, down.rank)
        saved = self._merge(model, delta)
        params = adapter_parameters(model, adapter)
        fresh = fresh_factors(self.modules, down.seed, rank=down.rank, init=self.init)
        load_adapter_tensors(model, {**fresh, **down.head}, adapter)
        trainable = {k: params[k] for k in [*fresh, *self.head_keys]}
        for key, p in params.items():
            p.requires_grad_(key in trainable)
        return LocalPlan(model=model, trainable=trainable, info={"saved": saved, "adapter": adapter})

    def _synced_delta(self, down: Downlink, client_state: MutableMapping[str, Any]) -> dict[str, Tensor] | None:
        """``flora.downlink: stacked``: the client's ``D`` brought to ``down.upto`` (replaced by a dense update, or
        the downlink's stacks added in round order with the server's merge), kept in ``client_state``.

        Raises:
            InputError: the stacks start after another round than the one the client's ``D`` holds.
        """
        held = int(client_state.get(SYNCED, 0))
        if down.delta is not None:
            delta = {name: value.detach().to("cpu", torch.float32, copy=True) for name, value in down.delta.items()}
        elif down.since == 0:
            delta = None
        elif down.since == held:
            delta = dict(client_state[DELTA_CACHE]) if DELTA_CACHE in client_state else None  # none: nothing merged
        else:
            raise InputError(f"FLoRA downlink adds the rounds after {down.since} but this client holds round {held}")
        for rnd in sorted(down.stacks):
            if delta is None:
                delta = {m.weight_name: torch.zeros(m.weight_shape) for m in self.modules}
            for m in self.modules:
                delta[m.weight_name] = add_stacked(delta[m.weight_name], m, *down.stacks[rnd][m.weight_name])
        client_state[SYNCED] = down.upto
        if delta is None:
            client_state.pop(DELTA_CACHE, None)
        else:
            client_state[DELTA_CACHE] = delta
        return delta

    @torch.no_grad()
    def _merge(self, model: nn.Module, delta: Mapping[str, Tensor] | None) -> dict[str, tuple[Tensor, bool]]:
        """Set every base weight to ``W0 + D``, frozen; return what each held before (value, ``requires_grad``)."""
        weights = model_tensor_map(model, [m.weight_name for m in self.modules])
        saved = {}
        for name, w in weights.items():
            saved[name] = (w.detach().clone(), w.requires_grad)
            w.requires_grad_(False)
            w.copy_(merged_weight(self.base[name], None if delta is None else delta[name]))
        return saved

    def _local_model(self, model: nn.Module, client_rank: int) -> tuple[nn.Module, str]:
        """The model to train and its adapter name: a rank-r_k adapter when r_k or its alpha differ from r's."""
        alpha = self.config.client_alpha(self.alpha, client_rank, self.rank)
        if client_rank == self.rank and alpha == self.alpha:
            return model, DEFAULT_ADAPTER
        if self.model_provider is None:
            raise InputError(f"a rank-{client_rank} FLoRA client needs a host that builds other ranks "
                             "(model_provider)")
        local = self.model_provider(r=client_rank, lora_alpha=alpha)
        return local, str(getattr(local, "active_adapter", DEFAULT_ADAPTER))

    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """Upload the trained factors and head; put the base weights back; re-activate the default adapter."""
        tensors = {k: p.detach().clone() for k, p in plan.trainable.items()}
        self._restore(plan.model, plan.info.pop("saved"))
        if plan.info["adapter"] != DEFAULT_ADAPTER and self.model_provider is not None:
            self.model_provider()  # the host's model is shared: re-activate its default adapter
        count = stats.num_samples if self.samples_cap is None else min(stats.num_samples, self.samples_cap)
        return Message(tensors, {NUM_SAMPLES: samples_tensor(count)})

    @staticmethod
    @torch.no_grad()
    def _restore(model: nn.Module, saved: Mapping[str, tuple[Tensor, bool]]) -> None:
        weights = model_tensor_map(model, list(saved))
        for name, (value, requires_grad) in saved.items():
            weights[name].copy_(value)
            weights[name].requires_grad_(requires_grad)
