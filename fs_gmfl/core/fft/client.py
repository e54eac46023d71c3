"""Client of federated full fine-tuning: load the global weights, train them, upload them."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

from torch import nn

from fs_gmfl.core.adapter import load_model_tensors, model_tensor_map
from fs_gmfl.core.message import NUM_SAMPLES, Message, samples_tensor
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, TrainStats
from fs_gmfl.errors import InputError


class FullWeightClient(ClientAlgorithm):
    """Trains the tensors named by ``keys`` (weight names and head adapter keys) from the downlink's values.

    Every downlink carries all of them, so the model needs no restoring
    after a client: the next downlink overwrites whatever a client trained.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)

    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """Load every trained tensor from the downlink and train all of them."""
        missing = [k for k in self.keys if k not in message.tensors]
        if missing:
            raise InputError(f"downlink lacks {len(missing)} trained tensors, e.g. '{missing[0]}'")
        load_model_tensors(model, {k: message.tensors[k] for k in self.keys})
        return LocalPlan(model=model, trainable=model_tensor_map(model, self.keys))

    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """Upload the trained tensors and the sample count."""
        tensors = {k: p.detach().to("cpu", copy=True) for k, p in plan.trainable.items()}
        return Message(tensors, {NUM_SAMPLES: samples_tensor(stats.num_samples)})
