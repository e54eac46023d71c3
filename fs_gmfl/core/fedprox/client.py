"""FedProx's client: FedIT's client whose plan carries the proximal term as its extra loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from torch import Tensor, nn

from fs_gmfl.core.fedavg.client import LoraClient
from fs_gmfl.core.fedprox.ops import proximal_term
from fs_gmfl.core.message import Message
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, TrainStats


def proximal_loss(trainable: Mapping[str, nn.Parameter], *, mu: float) -> Callable[[nn.Module], Tensor]:
    """The plan's extra loss: :func:`proximal_term` around the tensors' values now (the received global ones)."""
    anchor = {k: p.detach().clone() for k, p in trainable.items()}
    return lambda model: proximal_term(trainable, anchor, mu=mu)


class FedProxClient(ClientAlgorithm):
    """FedIT's client (``base``) with local objective ``F_k(w) + mu/2 ||w - w_global||^2`` (Li et al., eq. 2).

    The term covers exactly the tensors the plan trains (a GMFL-frozen key is
    neither trained nor anchored); ``mu = 0`` adds no term, so the run is FedIT's.
    """

    def __init__(self, base: LoraClient, *, mu: float) -> None:
        self.base = base
        self.mu = mu

    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """FedIT's plan with the proximal term."""
        return self.prepare_excluding(model, message, client_state, frozenset())

    def prepare_excluding(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any],
                          frozen: frozenset[str]) -> LocalPlan:
        """FedIT's plan without the keys ``frozen`` (GMFL base interface), with the proximal term."""
        plan = self.base.prepare_excluding(model, message, client_state, frozen)
        if self.mu > 0 and plan.trainable:
            plan.extra_loss = proximal_loss(plan.trainable, mu=self.mu)
        return plan

    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """FedIT's uplink: the trained tensors and the sample count."""
        return self.base.finish(plan, stats, client_state)
