"""The host-agnostic protocol between a method and a host.

A method is a pair:

* a server :class:`Strategy`, which owns the global state, writes one
  downlink :class:`~fs_gmfl.core.message.Message` per sampled client
  (:meth:`Strategy.configure_round`) and folds the uplinks back in
  (:meth:`Strategy.aggregate`);
* a :class:`ClientAlgorithm`, which turns a downlink into a
  :class:`LocalPlan` on the client's model (what to train, which gradient
  entries to mask, what to call after each optimiser step) and, after the
  host ran local training, turns the model into the uplink.

A host (the embedded simulator or the FederatedScope adapter) moves messages,
runs the training loop the plan describes, and counts bytes from the messages.
Neither side knows which host it runs in.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fs_gmfl.core.message import Message, Reply


@dataclass
class LocalPlan:
    """What the host's training loop must do for one client and round.

    Attributes:
        model: the module to train (may differ from the host's default model,
            e.g. a smaller-rank adapter).
        trainable: parameters to optimise, by key; the host sets
            ``requires_grad`` on exactly these and builds the optimiser over
            them (so frozen tensors get no gradient and no optimiser state).
        grad_masks: optional 0/1 masks multiplied into the gradient of the
            parameter with the same key (sub-tensor freezing).
        frozen_values: values the host restores after every optimiser step
            (entries selected by ``grad_masks == 0``), so decoupled weight
            decay cannot move frozen entries.
        after_step: optional callback ``f(step_index)`` after each optimiser step.
        extra_loss: optional term ``f(model) -> scalar tensor`` the host adds
            to every batch's loss before the backward pass (a regulariser of
            the local objective, e.g. FedProx's proximal term); the loss the
            host reports includes it. :meth:`total_loss` applies it.
        info: free-form values the algorithm wants back in :meth:`ClientAlgorithm.finish`.
        on_optimizer: optional callback ``f(optimizer)`` the host calls once
            with the optimiser it built over ``trainable``, before the first
            step (methods that reset or transform optimiser state between
            phases, or regroup parameters, keep it).
    """

    model: nn.Module
    trainable: dict[str, nn.Parameter]
    grad_masks: dict[str, Tensor] = field(default_factory=dict)
    frozen_values: dict[str, Tensor] = field(default_factory=dict)
    after_step: Callable[[int], None] | None = None
    extra_loss: Callable[[nn.Module], Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    on_optimizer: Callable[[Any], None] | None = None

    def total_loss(self, loss: Tensor) -> Tensor:
        """``loss`` plus :attr:`extra_loss` of the model (on ``loss``'s device), or ``loss`` itself; every host calls it
        on each batch's loss before the backward pass."""
        if self.extra_loss is None:
            return loss
        return loss + self.extra_loss(self.model).to(loss.device)

    @torch.no_grad()
    def restore_frozen_values(self) -> None:
        """Put back the frozen entries (``grad_masks == 0``) after an optimiser step; every host calls it."""
        for key, frozen in self.frozen_values.items():
            p = self.trainable[key]
            keep = self.grad_masks[key].to(torch.bool)
            p.copy_(torch.where(keep, p, frozen))


@dataclass
class TrainStats:
    """What the host reports about one client's local training."""

    num_samples: int
    steps: int
    mean_loss: float
    step_seconds: list[float] = field(default_factory=list)


class ClientAlgorithm(abc.ABC):
    """Client side of a method."""

    @abc.abstractmethod
    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """Load the downlink into ``model`` and describe local training.

        The model is shared by every client of a host, so anything a client
        changes beyond the adapter tensors the next downlink overwrites (for
        example merged backbone weights) must be restored in :meth:`finish`.

        Args:
            model: the host's model for this client (adapter already attached).
            message: the downlink.
            client_state: host-persisted per-client storage (empty at first
                contact); stateless methods ignore it.
        """

    @abc.abstractmethod
    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """Build the uplink after local training."""

    def host_state_dict(self, model: nn.Module) -> dict[str, Any]:
        """What this algorithm keeps in the host's shared ``model`` between rounds (for checkpoints); none here."""
        return {}

    def load_host_state_dict(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Restore :meth:`host_state_dict` into ``model``."""


@dataclass
class RoundReport:
    """What a strategy reports after aggregating one round."""

    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class RoundAggregation(abc.ABC):
    """One round's aggregation in progress: replies are pushed in one at a time as they arrive.

    A host that receives uplinks one by one (the FederatedScope server folds
    each ``model_para`` message on arrival) drives this directly; everything
    else calls :meth:`Strategy.aggregate`, which is this loop over an iterable.
    """

    @abc.abstractmethod
    def add(self, reply: Reply) -> str | None:
        """Screen ``reply`` and fold it in if accepted; the reason if rejected, else ``None``.

        The aggregation keeps no reference to ``reply`` or its tensors
        afterwards (only running sums of global-state size and, where a
        method needs them, small per-client values its docstring names).
        """

    @abc.abstractmethod
    def finish(self) -> RoundReport:
        """Turn the running sums into the new global state and report the round (call once)."""


class Strategy(abc.ABC):
    """Server side of a method."""

    name: str = "strategy"

    @abc.abstractmethod
    def configure_round(self, rnd: int, clients: Sequence[int]) -> dict[int, Message]:
        """Downlink message for each sampled client of round ``rnd`` (1-based)."""

    @abc.abstractmethod
    def start_aggregation(self, rnd: int) -> RoundAggregation:
        """Begin folding the uplinks of round ``rnd`` (:class:`RoundAggregation`).

        :class:`~fs_gmfl.core.uplinks.ScreenedStrategy` implements this once
        (screen each reply as it arrives, then hand it to the method's running sums).
        """

    def aggregate(self, rnd: int, replies: Iterable[Reply]) -> RoundReport:
        """Fold the uplinks of round ``rnd`` into the global state, one at a time (a streaming fold).

        ``replies`` is consumed lazily, in order, exactly once: a generator
        that trains a client and yields its reply keeps one uplink alive at a
        time, and server memory stays the global state plus one reply's
        worth of running sums, whatever the number of clients. A reply that
        fails validation is rejected (listed in the report) and changes
        nothing; with no accepted reply the global state is unchanged. The
        result is the same whether ``replies`` is a list or a generator.
        """
        aggregation = self.start_aggregation(rnd)
        for reply in replies:
            aggregation.add(reply)
            del reply  # otherwise the loop variable keeps this uplink alive while the iterable makes the next one
        return aggregation.finish()

    @abc.abstractmethod
    def global_adapter(self) -> dict[str, Tensor]:
        """The current global adapter tensors (for evaluation and checkpoints)."""

    def evaluation_adapters(self) -> dict[str, dict[str, Tensor]]:
        """Extra named tensor sets to evaluate besides :meth:`global_adapter` (default: none).

        Keys are adapter keys or plain parameter names. A name ``client:<id>``
        is evaluated on that client's local validation data (personalised
        evaluation); any other name (e.g. ``rank_2``) on the server's splits.
        """
        return {}

    def round_metrics(self) -> dict[str, float]:
        """Method-specific values logged every round (e.g. the frozen fraction)."""
        return {}

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: tensors and plain data."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
