"""LoRA-A2's server (spec GMFL.md section 7.4): FedIT's FedAvg restricted to the factor trained that round.

:class:`LoraA2FedAvg` is FedIT's :class:`~fs_gmfl.core.fedavg.strategy.LoraFedAvg`
whose trainable keys follow the round's parity
(:func:`~fs_gmfl.core.lora_a2.ops.trained_factor`): uplinks must hold exactly
that factor and the head, those are averaged with sample-count weights (as
FedIT), and the idle factor keeps its global value. LoRA-A2's adaptive rank
selection is not in the GMFL authors' code (spec 7.4) and is not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from fs_gmfl.core.fedavg.strategy import LoraFedAvg
from fs_gmfl.core.lora_a2.ops import idle_keys
from fs_gmfl.core.lora_a2.wire import PARITY, parity_tensor
from fs_gmfl.core.message import Message


class LoraA2FedAvg(LoraFedAvg):
    """FedIT whose round ``t`` trains, checks and averages only ``trained_factor(t)`` and the head.

    ``round`` is the round being configured or aggregated; it is set from the
    round number each time (:meth:`configure_round`, :meth:`begin_fold`), so
    it needs no checkpoint entry.
    """

    def __init__(self, initial: Mapping[str, Tensor], **kwargs) -> None:
        super().__init__(initial, variant="fedit", **kwargs)
        self.name = "lora_a2"
        self.round = 1

    def trainable_keys(self) -> list[str]:
        """FedIT's trainable keys without the factor this round keeps frozen."""
        idle = idle_keys(self.keys, self.round)
        return [k for k in super().trainable_keys() if k not in idle]

    def configure_round(self, rnd: int, clients: Sequence[int]) -> dict[int, Message]:
        """FedIT's downlink (the whole adapter) plus the round's parity."""
        self.round = rnd
        downlinks = super().configure_round(rnd, clients)
        parity = parity_tensor(rnd)
        for message in downlinks.values():
            message.control[PARITY] = parity
        return downlinks

    def begin_fold(self, rnd: int) -> None:
        """Running sums over round ``rnd``'s trained factor and the head."""
        self.round = rnd
        super().begin_fold(rnd)
