"""Client side of FedIT / FFA-LoRA (a GMFL base): load, train the trainable tensors, upload them."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from torch import nn

from fs_gmfl.core.adapter import adapter_parameters, load_adapter_tensors
from fs_gmfl.core.fedavg.strategy import base_trainable_keys
from fs_gmfl.core.message import NUM_SAMPLES, Message, samples_tensor
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, TrainStats
from fs_gmfl.errors import InputError

ADAPTER_CACHE = "adapter"


def processed_samples_cap(rule: str, *, batch_size: int, local_steps: int, batch_or_epoch: str) -> int | None:
    """The cap on a client's reported sample count under ``federate.client_weight``.

    ``processed_samples`` follows the GMFL reference code, whose FedAvg weight
    is ``|D_k| = min(bs * max_steps, |D|)`` (spec GMFL.md section 4): a
    client that trains ``local_steps`` batches of ``batch_size`` counts at most
    ``batch_size * local_steps`` samples. Under ``batch_or_epoch: epoch`` every
    sample is processed, so there is no cap; ``shard_size`` has none either.
    """
    if rule == "shard_size" or batch_or_epoch == "epoch":
        return None
    if rule != "processed_samples":
        raise ValueError(f"unknown client weight rule {rule!r}")
    return batch_size * local_steps


class LoraClient(ClientAlgorithm):
    """Trains the base-trainable adapter tensors that are not frozen, and uploads exactly those.

    Frozen tensors (GMFL, :meth:`prepare_excluding`) are left out of the plan,
    so the host gives them no gradient and no optimiser state, they stay
    bit-identical and they are not uploaded.

    Args:
        variant: ``"fedit"`` or ``"ffa_lora"``.
        stateful: the client caches the adapter between rounds
            (``gmfl.downlink: stateful_sync``).
        samples_cap: the reported sample count (the FedAvg weight) is
            ``min(num_samples, samples_cap)``; ``None`` reports the shard size
            (see :func:`processed_samples_cap`).
    """

    def __init__(self, variant: str, *, stateful: bool = False,
                 samples_cap: int | None = None) -> None:
        self.variant = variant
        self.stateful = stateful
        self.samples_cap = samples_cap

    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """Load the (cached + received) adapter and list the trainable parameters."""
        return self.prepare_excluding(model, message, client_state, frozenset())

    def prepare_excluding(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any],
                          frozen: frozenset[str]) -> LocalPlan:
        """:meth:`prepare` with the keys ``frozen`` neither trained nor uploaded (GMFL base interface)."""
        params = adapter_parameters(model)
        tensors = dict(message.tensors)
        if self.stateful:
            cache = client_state.setdefault(ADAPTER_CACHE, {})
            cache.update({k: v.clone() for k, v in tensors.items()})
            tensors = cache
        missing = [k for k in params if k not in tensors]
        if missing:
            raise InputError(f"downlink lacks {len(missing)} adapter tensors, e.g. '{missing[0]}'")
        load_adapter_tensors(model, tensors)
        keys = [k for k in base_trainable_keys(list(params), self.variant) if k not in frozen]
        return LocalPlan(model=model, trainable={k: params[k] for k in keys})

    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """Upload the trained tensors and the sample count (capped by ``samples_cap``)."""
        tensors = {k: p.detach().clone() for k, p in plan.trainable.items()}
        # The cache keeps the last *received* global values: local results are not global until aggregated.
        count = stats.num_samples if self.samples_cap is None else min(stats.num_samples, self.samples_cap)
        return Message(tensors, {NUM_SAMPLES: samples_tensor(count)})


class AdjustedLoraClient(ClientAlgorithm):
    """FedIT's client (``base``) with its plan adjusted: the shape of a base method that only changes what is trained.

    Subclasses override :meth:`prepare_excluding` (and :meth:`finish` when
    they must undo something); :meth:`prepare` is it with nothing frozen, and
    the uplink is FedIT's. ``prepare_excluding`` is the GMFL base interface
    (:mod:`fs_gmfl.core.gmfl.base`), so every such method composes with GMFL.
    """

    def __init__(self, base: LoraClient) -> None:
        self.base = base

    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """:meth:`prepare_excluding` with nothing frozen."""
        return self.prepare_excluding(model, message, client_state, frozenset())

    def prepare_excluding(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any],
                          frozen: frozenset[str]) -> LocalPlan:
        """FedIT's plan without the keys ``frozen``."""
        return self.base.prepare_excluding(model, message, client_state, frozen)

    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """FedIT's uplink: the trained tensors and the sample count."""
        return self.base.finish(plan, stats, client_state)
