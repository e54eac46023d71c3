"""Client side of FedIT / FFA-LoRA (+GMFL): load, freeze, train, upload the trainable tensors."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

from torch import nn

from fs_gmfl.core.adapter import adapter_parameters, load_adapter_tensors
from fs_gmfl.core.fedavg.strategy import base_trainable_keys
from fs_gmfl.core.fedavg.wire import MASK
from fs_gmfl.core.message import NUM_SAMPLES, Message, samples_tensor, unpack_bits
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, TrainStats
from fs_gmfl.errors import InputError

ADAPTER_CACHE = "adapter"
MASK_CACHE = "mask"


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
    """Trains the base-trainable adapter tensors the server's mask leaves trainable.

    Frozen tensors are excluded from the plan, so the host gives them no
    gradient and no optimiser state, they stay bit-identical and they are not
    uploaded.

    Args:
        variant: ``"fedit"`` or ``"ffa_lora"``.
        candidate_keys: the mask's key order (empty when GMFL is off).
        stateful: the client caches the adapter between rounds
            (``gmfl.downlink: stateful_sync``).
        samples_cap: the reported sample count (the FedAvg weight) is
            ``min(num_samples, samples_cap)``; ``None`` reports the shard size
            (see :func:`processed_samples_cap`).
    """

    def __init__(self, variant: str, candidate_keys: Sequence[str] = (), *, stateful: bool = False,
                 samples_cap: int | None = None) -> None:
        self.variant = variant
        self.candidate_keys = list(candidate_keys)
        self.stateful = stateful
        self.samples_cap = samples_cap

    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """Load the (cached + received) adapter, read the mask, list the trainable parameters."""
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
        frozen = self._frozen_keys(message, client_state)
        keys = [k for k in base_trainable_keys(list(params), self.variant) if k not in frozen]
        return LocalPlan(model=model, trainable={k: params[k] for k in keys})

    def _frozen_keys(self, message: Message, client_state: MutableMapping[str, Any]) -> set[str]:
        if MASK in message.control:
            flags = unpack_bits(message.control[MASK], len(self.candidate_keys)).tolist()
            if self.stateful:
                client_state[MASK_CACHE] = flags
        elif self.stateful and MASK_CACHE in client_state:
            flags = client_state[MASK_CACHE]
        else:
            return set()
        return {k for k, trainable in zip(self.candidate_keys, flags) if not trainable}

    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """Upload the trained tensors and the sample count (capped by ``samples_cap``)."""
        tensors = {k: p.detach().clone() for k, p in plan.trainable.items()}
        # The cache keeps the last *received* global values: local results are not global until aggregated.
        count = stats.num_samples if self.samples_cap is None else min(stats.num_samples, self.samples_cap)
        return Message(tensors, {NUM_SAMPLES: samples_tensor(count)})
