"""FedEx-LoRA's client: FedIT's client on the host model whose adapted base weights hold the global residual."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from torch import nn

from fs_gmfl.core.adapter import adapter_parameters, load_model_tensors
from fs_gmfl.core.fedavg.client import AdjustedLoraClient
from fs_gmfl.core.fedex_lora.wire import base_weights, residual_targets, split_downlink
from fs_gmfl.core.message import Message
from fs_gmfl.core.protocol import LocalPlan, TrainStats

#: ``LocalPlan.info`` entry holding the base weights the model had before :meth:`FedExLoraClient.prepare`.
SAVED_BASE = "fedex_lora_saved_base"


class FedExLoraClient(AdjustedLoraClient):
    """FedIT's client (``base``) that first sets the adapted base weights to the downlink's (``W0`` + residuals).

    The host's model is shared by every client of a host
    (:meth:`~fs_gmfl.core.protocol.ClientAlgorithm.prepare`), so
    :meth:`prepare` keeps the base weights it replaces and :meth:`finish`
    puts them back: nothing is left in the model between rounds
    (``host_state_dict`` stays empty). The base weights are loaded as absolute
    values, never added to, so a model that already holds them (a host
    loaded the global model into it) is not changed twice. Local training
    and the uplink are FedIT's: the trained LoRA factors and head.
    """

    def prepare_excluding(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any],
                          frozen: frozenset[str]) -> LocalPlan:
        """FedIT's plan on ``model`` with the downlink's base weights loaded, the keys ``frozen`` neither trained nor
        uploaded (GMFL base interface)."""
        targets = residual_targets(model, adapter_parameters(model))
        adapter, weights = split_downlink(message.tensors, targets)
        saved = base_weights(model, targets)
        load_model_tensors(model, weights)
        try:
            plan = self.base.prepare_excluding(model, Message(adapter, message.control), client_state, frozen)
        except Exception:
            load_model_tensors(model, saved)
            raise
        plan.info[SAVED_BASE] = saved
        return plan

    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """Put the model's base weights back as :meth:`prepare` found them; FedIT's uplink."""
        load_model_tensors(plan.model, plan.info.pop(SAVED_BASE))
        return self.base.finish(plan, stats, client_state)
