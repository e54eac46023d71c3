"""Server side of the toy method: sample-weighted mean of the head; the LoRA factors never change."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fs_gmfl.core.adapter import HEAD, kind_of
from fs_gmfl.core.fedavg.ops import WeightedSum
from fs_gmfl.core.message import Message, Reply
from fs_gmfl.core.protocol import RoundReport
from fs_gmfl.core.uplinks import ReplyGate, ScreenedStrategy, UplinkPolicy, like_on_wire
from fs_gmfl.core.validation import check_tensors


class HeadAverage(ScreenedStrategy):
    """Sends the head, averages the uploaded heads by sample count and moves ``server_lr`` of the way there."""

    name = "toy_head"

    def __init__(self, initial: Mapping[str, Tensor], server_lr: float = 1.0) -> None:
        self.server_lr = server_lr
        self.global_state = {k: v.detach().clone() for k, v in initial.items()}
        self.head_keys = [k for k in self.global_state if kind_of(k) == HEAD]
        self.policy = UplinkPolicy()
        self.gate = ReplyGate()

    def configure_round(self, rnd: int, clients: Sequence[int]) -> dict[int, Message]:
        """Every sampled client gets the current head."""
        self.gate.open(rnd, clients)
        return {cid: Message({k: self.global_state[k].clone() for k in self.head_keys}) for cid in clients}

    def check_reply(self, reply: Reply) -> str | None:
        """Why an uplink is unacceptable: not exactly the head tensors, or a change too large."""
        reference = {k: self.global_state[k] for k in self.head_keys}
        tensors = reply.message.tensors
        return (check_tensors(tensors, like_on_wire(reference, self.policy), expected_keys=self.head_keys,
                              max_abs=self.policy.max_abs)
                or self.policy.check_deltas((k, tensors[k], reference[k]) for k in self.head_keys))

    def begin_fold(self, rnd: int) -> None:
        """Empty running sums of the heads."""
        self._sums = WeightedSum(self.head_keys)

    def fold_reply(self, reply: Reply, parsed: None) -> None:
        """Add one accepted head, weighted by its sample count."""
        self._sums.add(reply.message.tensors, reply.message.num_samples)

    def end_fold(self, rnd: int, report: RoundReport) -> None:
        """Sample-weighted mean of the accepted heads; nothing changes without one."""
        sums, self._sums = self._sums, None
        if not sums.count:
            return
        for key in self.head_keys:
            old = self.global_state[key]
            mean = sums.sums[key] / sums.total
            step = mean if self.server_lr == 1.0 else old.double() + self.server_lr * (mean - old.double())
            self.global_state[key] = step.to(old.dtype)

    def global_adapter(self) -> dict[str, Tensor]:
        """The global adapter (a copy)."""
        return {k: v.clone() for k, v in self.global_state.items()}

    def state_dict(self) -> dict[str, Any]:
        """The global tensors."""
        return {"global": self.global_adapter()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.global_state = {k: v.clone() for k, v in state["global"].items()}
