"""FedKRSO bytes per round without weights (``fs-gmfl comm``), beside FedIT LoRA and full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fs_gmfl.core.estimate import (affine_bytes, breakdown, head_of, meta_targets, per_round_totals,
                                   trained_summary, uplink_message)
from fs_gmfl.core.fedkrso import wire
from fs_gmfl.core.fedkrso.config import FedKRSOConfig
from fs_gmfl.core.fedkrso.ops import expected_seeds_used, intervals_per_round, layer_rank
from fs_gmfl.core.message import Message
from fs_gmfl.core.registry import EstimateContext
from fs_gmfl.core.targets import TargetLayer


@dataclass
class MetaMessages:
    """FedKRSO's real messages on meta tensors, for a given number of seeds used."""

    cfg: FedKRSOConfig
    layers: list[TargetLayer]
    head: dict[str, Tensor]
    dtype: torch.dtype

    def accumulators(self, used: int) -> dict[int, dict[str, Tensor]]:
        """Per used seed, one accumulator per layer."""
        return {s: {la.name: torch.empty(la.d_out, layer_rank(la, self.cfg.rank), dtype=self.dtype, device="meta")
                    for la in self.layers} for s in range(used)}

    def uplink(self, used: int, all_slots: bool = False) -> Message:
        """A client's uplink after using ``used`` seeds (``all_slots``: every seed's slot sent)."""
        return wire.uplink_message(self.accumulators(used), self.layers, rank=self.cfg.rank,
                                   num_seeds=self.cfg.num_seeds, head=self.head, num_samples=1,
                                   all_slots=all_slots, dtype=self.dtype, device="meta")

    def downlink(self, used: int) -> Message:
        """A downlink replaying one round in which ``used`` seeds were used."""
        acc = self.accumulators(used)
        entry = wire.LogEntry(1, list(range(used)),
                              {la.name: torch.stack([acc[s][la.name] for s in range(used)]) for la in self.layers})
        return wire.downlink_message(seeds=range(self.cfg.num_seeds), schedule_seed=0, version=1, head=self.head,
                                     replay=[entry])


def estimate_fedkrso(ctx: EstimateContext) -> dict[str, Any]:
    """FedKRSO bytes per client and round, with FedIT LoRA (same rank and targets) and full fine-tuning.

    Messages are built by FedKRSO's own wire code on meta tensors. Expected
    values use ``E|U_n| = K (1 - (1 - 1/K)^I)`` seeds per client (``I``
    intervals) and ``E|U| = K (1 - (1 - 1/K)^(I C))`` seeds per round (``C``
    clients), exact because messages are affine in the number of seeds.
    """
    cfg, k = ctx.cfg, ctx.cfg.fedkrso
    layers, weights, targets = meta_targets(ctx, k.target_modules, "fedkrso.target_modules")
    head = head_of(ctx.initial)
    messages = MetaMessages(k, layers, head, next(iter(weights.values())).dtype)
    clients = cfg.federate.clients_per_round()
    intervals = intervals_per_round(cfg.train.local_update_steps, k.interval)
    per_client = expected_seeds_used(k.num_seeds, intervals)
    per_round = expected_seeds_used(k.num_seeds, intervals * clients)
    full_sync = breakdown(wire.downlink_message(seeds=range(k.num_seeds), schedule_seed=0, version=1, head=head,
                                                full=weights))
    profiles = {"expected": {"clients_share": 1.0, "uplink": affine_bytes(messages.uplink, per_client),
                             "downlink": affine_bytes(messages.downlink, per_round)}}
    return {
        "target_modules": targets,
        "adapter": trained_summary(weights, head),
        "fedkrso": {"layers": len(layers), "rows_R": sum(la.d_out for la in layers), "num_seeds": k.num_seeds,
                    "rank": k.rank, "interval": k.interval, "local_steps": cfg.train.local_update_steps,
                    "intervals": intervals, "expected_seeds_per_client": per_client,
                    "expected_seeds_per_round": per_round},
        "uplink_bytes": {"one_seed": breakdown(messages.uplink(1))["bytes"],
                         "expected": profiles["expected"]["uplink"]["bytes"],
                         "all_slots": breakdown(messages.uplink(0, all_slots=True))["bytes"]},
        "downlink_bytes": {"one_round_expected": profiles["expected"]["downlink"]["bytes"],
                           "one_round_all_seeds": breakdown(messages.downlink(k.num_seeds))["bytes"],
                           "full_sync": full_sync["bytes"]},
        "baselines_uplink_bytes": baselines_uplink_bytes(layers, weights, head, k.rank),
        "profiles": profiles,
        "per_round": per_round_totals(profiles, clients),
    }


def baselines_uplink_bytes(layers: list[TargetLayer], weights: dict[str, Tensor], head: dict[str, Tensor],
                           rank: int) -> dict[str, int]:
    """A client's uplink under FedIT LoRA of the same rank and targets, and under full fine-tuning."""
    dtype = next(iter(weights.values())).dtype
    lora = {f"{la.name}.lora_{f}": torch.empty(shape, dtype=dtype, device="meta") for la in layers
            for f, shape in (("A", (rank, la.d_in)), ("B", (la.d_out, rank)))}
    fft = breakdown(uplink_message({**weights, **head}, list({**weights, **head})))
    return {"fedit_lora_same_rank_and_targets": breakdown(uplink_message({**lora, **head},
                                                                         list({**lora, **head})))["bytes"],
            "fft_targeted_and_head": fft["bytes"]}
