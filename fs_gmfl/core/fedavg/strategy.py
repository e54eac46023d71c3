"""FedIT / FFA-LoRA server strategy, a GMFL base.

* FedIT (Zhang et al., "Towards Building the Federated GPT", ICASSP 2024):
  sample-weighted FedAvg of every LoRA factor and the head.
* FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated
  Learning", ICLR 2024): ``lora_A`` stays at its shared initial value; only
  ``lora_B`` and the head are trained and averaged.
* As a GMFL base (:mod:`fs_gmfl.core.gmfl.base`): every candidate LoRA tensor
  is its own mask unit (all LoRA tensors for FedIT, ``lora_B`` for FFA-LoRA;
  FedAvg averages each tensor on its own, as the GMFL reference code masks
  them); frozen tensors are not expected in uplinks and keep their global value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fs_gmfl.core.adapter import LORA_A, LORA_B, kind_of
from fs_gmfl.core.fedavg.ops import WeightedSum
from fs_gmfl.core.message import Message, Reply
from fs_gmfl.core.protocol import RoundReport
from fs_gmfl.core.uplinks import ReplyGate, ScreenedStrategy, UplinkPolicy, expected_float_dtype, like_on_wire
from fs_gmfl.core.validation import DEFAULT_MAX_ABS, check_tensors

VARIANTS = ("fedit", "ffa_lora")


def base_trainable_keys(keys: Sequence[str], variant: str) -> list[str]:
    """Keys a client trains under the base method (FFA-LoRA never trains ``lora_A``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown base method {variant!r}; expected one of {VARIANTS}")
    return [k for k in keys if not (variant == "ffa_lora" and kind_of(k) == LORA_A)]


def mask_candidate_keys(keys: Sequence[str], variant: str) -> list[str]:
    """Keys GMFL may freeze: all LoRA tensors (FedIT) or the ``lora_B`` tensors (FFA-LoRA)."""
    kinds = (LORA_B,) if variant == "ffa_lora" else (LORA_A, LORA_B)
    return [k for k in keys if kind_of(k) in kinds]


class LoraFedAvg(ScreenedStrategy):
    """Sample-weighted FedAvg of LoRA adapters; a GMFL base (one tensor per mask unit).

    Args:
        initial: the initial global adapter (LoRA factors and head).
        variant: ``"fedit"`` or ``"ffa_lora"``.
        downlink: ``"stateless"`` (full adapter to every sampled client) or
            ``"stateful_sync"`` (only tensors changed since the client's last
            sync; clients cache the adapter, ``gmfl.downlink``).
        max_abs: uploads with a larger absolute entry are rejected (``policy.max_abs``).

    Attributes:
        policy: the uplink bounds (:class:`~fs_gmfl.core.uplinks.UplinkPolicy`).
        frozen: keys GMFL froze (:meth:`set_frozen`).
    """

    def __init__(
        self,
        initial: Mapping[str, Tensor],
        *,
        variant: str = "fedit",
        downlink: str = "stateless",
        max_abs: float = DEFAULT_MAX_ABS,
    ) -> None:
        self.name = variant
        self.variant = variant
        self.global_state = {k: v.detach().clone() for k, v in initial.items()}
        self.keys = list(self.global_state)
        self.base_trainable = base_trainable_keys(self.keys, variant)
        self.downlink = downlink
        self.policy = UplinkPolicy(max_abs=max_abs)
        self.gate = ReplyGate()
        self.frozen: frozenset[str] = frozenset()
        self.changed_at = {k: 0 for k in self.keys}
        self.client_sync: dict[int, int] = {}
        self._sums: WeightedSum | None = None  # the open round's running sums

    def trainable_keys(self) -> list[str]:
        """Keys clients train this round (base-trainable and not frozen)."""
        return [k for k in self.base_trainable if k not in self.frozen]

    # -- GMFL base (fs_gmfl.core.gmfl.base) ----------------------------------------------------
    def mask_units(self) -> dict[str, tuple[str, ...]]:
        """Every candidate LoRA tensor is its own unit, named by its key (FedAvg averages tensors independently)."""
        return {k: (k,) for k in mask_candidate_keys(self.keys, self.variant)}

    def unit_values(self) -> dict[str, Tensor]:
        """Each unit's global tensor (replaced, never modified in place, by aggregation)."""
        return {k: self.global_state[k] for k in mask_candidate_keys(self.keys, self.variant)}

    def set_frozen(self, keys: frozenset[str]) -> None:
        """Frozen tensors are not expected in uplinks and keep their global value."""
        self.frozen = frozenset(keys)

    # -- downlink ----------------------------------------------------------------------------
    def configure_round(self, rnd: int, clients: Sequence[int]) -> dict[int, Message]:
        """Full adapter (stateless) or the tensors changed since the client's last sync (stateful).

        Every downlink of the round refers to one copy of the global adapter,
        so the server holds one copy however many clients are sampled (hosts
        copy or encode a downlink when they deliver it).
        """
        self.gate.open(rnd, clients)
        snapshot = {k: v.clone() for k, v in self.global_state.items()}
        return {cid: self._downlink(rnd, cid, snapshot) for cid in clients}

    def _downlink(self, rnd: int, cid: int, snapshot: Mapping[str, Tensor]) -> Message:
        synced = self.client_sync.get(cid) if self.downlink == "stateful_sync" else None
        keys = self.keys if synced is None else [k for k in self.keys if self.changed_at[k] > synced]
        self.client_sync[cid] = rnd - 1
        return Message({k: snapshot[k] for k in keys})

    # -- aggregation -------------------------------------------------------------------------
    def begin_fold(self, rnd: int) -> None:
        """Empty running sums over this round's trainable keys."""
        self._sums = WeightedSum(self.trainable_keys())

    def fold_reply(self, reply: Reply, parsed: None) -> None:
        """Add one accepted uplink, weighted by its sample count."""
        self._sums.add(reply.message.tensors, reply.message.num_samples)

    def end_fold(self, rnd: int, report: RoundReport) -> None:
        """FedAvg over trainable keys; frozen keys keep their value."""
        sums, self._sums = self._sums, None
        trainable = sums.keys
        old = self.global_state
        if sums.count and trainable:
            avg = sums.average({k: expected_float_dtype(old[k], self.policy) for k in trainable})  # as uploaded
            new = {k: avg[k].to(old[k].dtype) if k in avg else old[k] for k in self.keys}
            for k in trainable:
                if not torch.equal(new[k], old[k]):
                    self.changed_at[k] = rnd
            self.global_state = new

    def check_reply(self, reply: Reply) -> str | None:
        """Why an uplink is unacceptable: its tensors (exactly the trainable keys, wire dtype) or their change."""
        trainable = self.trainable_keys()
        tensors = reply.message.tensors
        policy = self.policy
        reference = {k: self.global_state[k] for k in trainable}
        return (check_tensors(tensors, like_on_wire(reference, policy), expected_keys=trainable,
                              max_abs=policy.max_abs)
                or policy.check_deltas((k, tensors[k], reference[k]) for k in trainable))

    # -- reporting / persistence -------------------------------------------------------------
    def global_adapter(self) -> dict[str, Tensor]:
        """The global adapter (a copy)."""
        return {k: v.clone() for k, v in self.global_state.items()}

    def round_metrics(self) -> dict[str, float]:
        """Nothing frozen (the GMFL wrapper reports its own fractions)."""
        return {"frozen_fraction": 0.0, "frozen_numel_fraction": 0.0}

    def state_dict(self) -> dict[str, Any]:
        """Global tensors, change rounds and the client sync table (the round of each client's last sync)."""
        return {
            "global": self.global_adapter(),
            "changed_at": dict(self.changed_at),
            "client_sync": {int(c): int(v) for c, v in self.client_sync.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if set(state["global"]) != set(self.keys):
            raise ValueError("checkpoint adapter keys do not match this model")
        self.global_state = {k: state["global"][k].clone() for k in self.keys}
        self.changed_at = {k: int(state["changed_at"][k]) for k in self.keys}
        self.client_sync = {int(c): int(v) for c, v in state["client_sync"].items()}
