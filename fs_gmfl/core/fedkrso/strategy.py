"""FedKRSO server: round seeds, per-seed accumulator averaging, streaming update, catch-up log.

Yang et al., "FedKRSO: Communication and Memory Efficient Federated
Fine-Tuning of Large Language Models", arXiv 2602.03019 (2026); spec
``FedKRSO.md`` §3-§6 and §9.1.

The server keeps the fp32 master of every targeted weight ``W^t`` and the head
``Phi^t``. Each round it draws ``K`` seeds; after the round it averages the
uploaded accumulators seed by seed (clients that did not use a seed count as
zero), applies ``W += sum_k Bbar_k P_k`` layer by layer in place, and appends
``(seeds, Bbar)`` to a log. A client's next downlink replays the log entries
since its last sync, or carries the full targeted weights when that is
cheaper (``catchup``), so stateful clients reach ``W^t`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fs_gmfl.core.fedavg.ops import WeightedSum
from fs_gmfl.core.fedkrso import wire
from fs_gmfl.core.fedkrso.config import FedKRSOConfig
from fs_gmfl.core.fedkrso.ops import SeedSums, apply_update_, layer_rank, round_seeds
from fs_gmfl.core.message import Message, Reply, tensor_bytes
from fs_gmfl.core.protocol import RoundReport
from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.core.targets import TargetLayer
from fs_gmfl.core.uplinks import ReplyGate, ScreenedStrategy, UplinkPolicy, l2
from fs_gmfl.core.validation import DEFAULT_MAX_ABS


@dataclass
class _RoundSums:
    """The open round's running sums: per layer its :class:`~fs_gmfl.core.fedkrso.ops.SeedSums`, and the head."""

    layers: dict[str, SeedSums]
    head: WeightedSum
    clients: int = 0
    seeds_per_client: int = 0


class FedKRSOStrategy(ScreenedStrategy):
    """Server side of FedKRSO.

    Args:
        config: the ``fedkrso`` configuration.
        layers: the targeted layers.
        weights: initial targeted weights ``W^0`` by weight name (copied).
        head: initial head ``Phi^0`` by adapter key (copied; may be empty).
        seed: master seed of round seeds and interval schedules.
        max_abs: uploads with a larger absolute entry are rejected (``policy.max_abs``).

    Attributes:
        policy: the uplink bounds (:class:`~fs_gmfl.core.uplinks.UplinkPolicy`). An accumulator is itself an
            update, bounded relative to the norm of the layer's weight; the head's change relative to the head.
    """

    name = "fedkrso"

    def __init__(self, config: FedKRSOConfig, layers: Sequence[TargetLayer], weights: Mapping[str, Tensor],
                 head: Mapping[str, Tensor], *, seed: int = 0, max_abs: float = DEFAULT_MAX_ABS) -> None:
        self.config = config
        self.layers = list(layers)
        self.weights = {layer.name: weights[layer.name].detach().clone() for layer in self.layers}
        self.head = {k: v.detach().clone() for k, v in head.items()}
        self.seed = seed
        self.policy = UplinkPolicy(max_abs=max_abs)
        self.gate = ReplyGate()
        self.version = 0
        self.log: list[wire.LogEntry] = []
        self.client_version: dict[int, int] = {}
        self.last_catchup: dict[int, str] = {}
        self._sums: _RoundSums | None = None

    @property
    def dtype(self) -> torch.dtype:
        """Element type of the targeted weights (and of accumulators on the wire)."""
        return next(iter(self.weights.values())).dtype if self.weights else torch.float32

    def seeds_of(self, rnd: int) -> list[int]:
        """The ``K`` seeds of round ``rnd`` (a pure function of the master seed and ``rnd``)."""
        return round_seeds(self.seed, rnd, count=self.config.num_seeds, bits=self.config.seed_bits)

    def full_sync_bytes(self) -> int:
        """Bytes of the targeted weights (a full sync)."""
        return sum(tensor_bytes(w) for w in self.weights.values())

    # -- downlink ----------------------------------------------------------------------------------------------
    def configure_round(self, rnd: int, clients: Sequence[int]) -> dict[int, Message]:
        """Seeds, schedule seed, head and catch-up for each sampled client."""
        seeds = self.seeds_of(rnd)
        self.gate.open(rnd, clients)
        out = {}
        for cid in clients:
            replay, full = self._catchup(self.client_version.get(cid, 0))
            out[cid] = wire.downlink_message(seeds=seeds, schedule_seed=derive_seed(self.seed, "schedule", rnd, cid),
                                             version=self.version, head=self.head, replay=replay, full=full)
            self.last_catchup[cid] = "full" if full is not None else "replay"
            self.client_version[cid] = self.version
        return out

    def replay_bytes(self, since: int) -> int | None:
        """Bytes of replaying every round after version ``since`` (``None`` if the log no longer reaches back)."""
        entries = [e for e in self.log if e.round > since]
        if len(entries) != self.version - since:
            return None
        return sum(e.nbytes for e in entries)

    def _catchup(self, since: int) -> tuple[list[wire.LogEntry], dict[str, Tensor] | None]:
        replay_cost = self.replay_bytes(since)
        policy = self.config.catchup
        stale = since < self.version - 1
        use_full = replay_cost is None or (policy == "full" and stale) or (
            policy == "auto" and replay_cost > self.full_sync_bytes())
        if use_full:
            return [], self.weights
        return [e for e in self.log if e.round > since], None

    # -- aggregation -------------------------------------------------------------------------------------------
    def begin_fold(self, rnd: int) -> None:
        """Empty running sums: per layer one per seed slot, and the head's."""
        k = self.config.num_seeds
        self._sums = _RoundSums({layer.name: SeedSums(k, layer.d_out, layer_rank(layer, self.config.rank))
                                 for layer in self.layers}, WeightedSum(list(self.head)))

    def fold_reply(self, reply: Reply, slots: list[int]) -> None:
        """Add one accepted uplink's accumulators (slot by slot) and head, with the client's weight."""
        sums, msg = self._sums, reply.message
        weight = 1.0 if self.config.weighting == "uniform" else float(msg.num_samples)
        for layer in self.layers:
            sums.layers[layer.name].add(slots, msg.tensors[wire.acc_key(layer.name)], weight)
        if self.head:
            sums.head.add(msg.tensors, weight)
        sums.clients += 1
        sums.seeds_per_client += len(slots)

    def end_fold(self, rnd: int, report: RoundReport) -> None:
        """Average per seed, update ``W`` layer by layer and the head, log the round."""
        sums, self._sums = self._sums, None
        entry = self._empty_entry(rnd)
        if sums.clients:
            entry = self._apply(rnd, sums)
            report.metrics.update({"seeds_used": float(len(entry.seeds)),
                                   "mean_client_seeds": sums.seeds_per_client / sums.clients})
        self.log.append(entry)
        self.version = rnd
        self._prune_log()

    def check_reply(self, reply: Reply) -> list[int] | str:
        """The slots of a valid uplink, or why it is unacceptable (format, then the update-norm bound)."""
        msg, policy = reply.message, self.policy
        slots, reason = wire.check_uplink(msg, layers=self.layers, rank=self.config.rank,
                                          num_seeds=self.config.num_seeds, all_slots=self.config.send_all_slots,
                                          head=self.head, dtype=policy.wire_dtype, max_abs=policy.max_abs)
        if reason or slots is None:
            return reason or "invalid slots"
        for layer in self.layers:
            key = wire.acc_key(layer.name)
            acc = msg.tensors[key]
            reason = policy.check_update(key, l2(acc), l2(self.weights[layer.name]), acc.numel())
            if reason:
                return reason
        return policy.check_deltas((k, msg.tensors[k], v) for k, v in self.head.items()) or slots

    def _apply(self, rnd: int, sums: _RoundSums) -> wire.LogEntry:
        seeds = self.seeds_of(rnd)
        wire_dtype = self.policy.wire_dtype  # the averages pass through the uploads' dtype, as uploaded
        averaged = {name: layer_sums.average(wire_dtype) for name, layer_sums in sums.layers.items()}
        union = next(iter(averaged.values()))[0] if averaged else []
        keep = [j for j in range(len(union)) if any(bool(avg[j].any()) for _, avg in averaged.values())]
        entry = wire.LogEntry(rnd, [seeds[union[j]] for j in keep])
        for layer in self.layers:
            avg = averaged.pop(layer.name)[1][keep].to(self.dtype)  # uploads may travel in a narrower dtype
            apply_update_(self.weights[layer.name], avg, entry.seeds, layer=layer, rank=self.config.rank,
                          basis=self.config.basis)
            entry.tensors[layer.name] = avg
        if self.head:
            averaged_head = sums.head.average({k: wire_dtype if v.is_floating_point() else v.dtype
                                               for k, v in self.head.items()})
            self.head = {k: v.to(self.head[k].dtype) for k, v in averaged_head.items()}
        return entry

    def _empty_entry(self, rnd: int) -> wire.LogEntry:
        """A round without accepted replies: no seeds and zero-size averages, so its replay stays well formed."""
        return wire.LogEntry(rnd, [], {layer.name: torch.zeros((0, layer.d_out, layer_rank(layer, self.config.rank)),
                                                               dtype=self.dtype) for layer in self.layers})

    def _prune_log(self) -> None:
        """Drop entries no catch-up under the policy can use (``replay`` keeps all; ``full`` only the last)."""
        policy = self.config.catchup
        if policy == "replay":
            return
        if policy == "full":
            self.log = self.log[-1:]
            return
        budget, kept = self.full_sync_bytes(), []
        for entry in reversed(self.log):
            budget -= entry.nbytes
            if budget < 0:
                break
            kept.append(entry)
        self.log = kept[::-1]

    # -- reporting / persistence -------------------------------------------------------------------------------
    def global_adapter(self) -> dict[str, Tensor]:
        """The global targeted weights (by parameter name) and head (copies)."""
        return {**{k: v.clone() for k, v in self.weights.items()}, **{k: v.clone() for k, v in self.head.items()}}

    def round_metrics(self) -> dict[str, float]:
        """Entries and bytes held in the catch-up log."""
        return {"log_entries": float(len(self.log)), "log_bytes": float(sum(e.nbytes for e in self.log))}

    def state_dict(self) -> dict[str, Any]:
        """Weights, head, version, per-client sync versions and the catch-up log."""
        return {"weights": {k: v.clone() for k, v in self.weights.items()},
                "head": {k: v.clone() for k, v in self.head.items()},
                "version": self.version,
                "client_version": dict(self.client_version),
                "log": [{"round": e.round, "seeds": list(e.seeds), "tensors": {k: v.clone() for k, v in
                                                                                e.tensors.items()}}
                        for e in self.log]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same layers and head keys)."""
        if set(state["weights"]) != set(self.weights) or set(state["head"]) != set(self.head):
            raise ValueError("checkpoint weights or head keys do not match this model")
        self.weights = {k: state["weights"][k].clone() for k in self.weights}
        self.head = {k: state["head"][k].clone() for k in self.head}
        self.version = int(state["version"])
        self.client_version = {int(c): int(v) for c, v in state["client_version"].items()}
        self.log = [wire.LogEntry(int(e["round"]), [int(s) for s in e["seeds"]],
                                  {k: v.clone() for k, v in e["tensors"].items()}) for e in state["log"]]
