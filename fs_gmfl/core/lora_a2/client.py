"""LoRA-A2's client (spec GMFL.md section 7.4): FedIT's client, the idle factor of the round frozen."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from torch import nn

from fs_gmfl.core.adapter import adapter_parameters
from fs_gmfl.core.fedavg.client import AdjustedLoraClient
from fs_gmfl.core.lora_a2.ops import idle_keys
from fs_gmfl.core.lora_a2.wire import round_of_parity
from fs_gmfl.core.message import Message
from fs_gmfl.core.protocol import LocalPlan


class LoraA2Client(AdjustedLoraClient):
    """FedIT's client (``base``) that freezes the factor the downlink's parity leaves idle.

    The frozen factor is left out of the plan (no gradient, no optimiser
    state, unchanged) and so out of the uplink: a client uploads the factor
    it trained and the head. Under GMFL (spec 7.4) the tensors of that factor
    the mask freezes are left out as well.
    """

    def prepare_excluding(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any],
                          frozen: frozenset[str]) -> LocalPlan:
        """FedIT's plan without the round's idle factor (:func:`~fs_gmfl.core.lora_a2.ops.idle_factor`) nor the
        keys ``frozen`` (the GMFL base interface, :mod:`fs_gmfl.core.gmfl.base`)."""
        idle = idle_keys(adapter_parameters(model), round_of_parity(message))
        return self.base.prepare_excluding(model, message, client_state, idle | frozen)
