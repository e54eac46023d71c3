"""Client side of the toy method: load the head, train it, upload it."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

from torch import nn

from fs_gmfl.core.adapter import load_model_tensors, model_tensor_map
from fs_gmfl.core.message import NUM_SAMPLES, Message, samples_tensor
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, TrainStats


class HeadClient(ClientAlgorithm):
    """Trains the head tensors named by ``keys``."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)

    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """Load the downlink's head and train only it."""
        load_model_tensors(model, message.tensors)
        return LocalPlan(model=model, trainable=model_tensor_map(model, self.keys))

    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """Upload the trained head and the sample count."""
        tensors = {k: p.detach().to("cpu", copy=True) for k, p in plan.trainable.items()}
        return Message(tensors, {NUM_SAMPLES: samples_tensor(stats.num_samples)})
