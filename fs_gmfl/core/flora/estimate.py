"""FLoRA's bytes per round without weights (``fs-gmfl comm``): one profile per rank profile.

Downlink: the dense merged update of every adapted module (from round 2 on;
round 1 has none), the head, the seed and the rank. Uplink: the client's
rank-r_k factors, the head and the sample count. For comparison the
estimate also reports what one round's stacked factors would cost instead
of the dense update (``stacked_alternative``; not what is sent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fs_gmfl.core.estimate import breakdown, per_round_totals
from fs_gmfl.core.flora.strategy import strategy_for
from fs_gmfl.core.message import Message, samples_tensor

if TYPE_CHECKING:
    from fs_gmfl.core.flora.strategy import FLoRAStrategy
    from fs_gmfl.core.registry import EstimateContext


def uplink_of_rank(strategy: FLoRAStrategy, client_rank: int) -> Message:
    """The uplink of a rank-``client_rank`` client, on the meta device."""
    tensors = {}
    for m in strategy.modules:
        tensors[m.pair.a_key] = torch.empty(client_rank, m.d_in, device="meta")
        tensors[m.pair.b_key] = torch.empty(m.d_out, client_rank, device="meta")
    tensors.update(strategy.head)
    return Message(tensors, {"num_samples": samples_tensor(1)})


def stacked_bytes(strategy: FLoRAStrategy, stacked_rank: float) -> float:
    """fp32 bytes of one round's stacked factors of total rank ``stacked_rank``: ``4 R sum_m (d_in + d_out)``."""
    return 4 * stacked_rank * sum(m.d_in + m.d_out for m in strategy.modules)


def estimate(ctx: EstimateContext) -> dict[str, Any]:
    """Per rank profile: the downlink of a round after the first (dense ``D``) and the rank-r_k uplink."""
    cfg = ctx.cfg
    strategy, profile_of = strategy_for(cfg, ctx.initial, ctx.meta_model())
    first = {}
    profiles: dict[str, dict[str, Any]] = {}
    for index, profile in enumerate(cfg.flora.profiles or [None]):
        ids = [c for c, p in enumerate(profile_of) if p == (index if profile is not None else -1)]
        if not ids:
            continue
        name = profile.label() if profile is not None else "full"
        first[name] = breakdown(strategy.configure_round(1, ids[:1])[ids[0]])
        strategy.rounds_merged = 1
        downlink = breakdown(strategy.configure_round(2, ids[:1])[ids[0]])
        strategy.rounds_merged = 0
        rank = strategy.ranks[ids[0]]
        profiles[name] = {"clients_share": len(ids) / cfg.federate.client_num, "rank": rank,
                          "uplink": breakdown(uplink_of_rank(strategy, rank)), "downlink": downlink}
    clients = cfg.federate.clients_per_round()
    mean_rank = sum(p["clients_share"] * p["rank"] for p in profiles.values())
    round_one = {name: {**p, "downlink": first[name]} for name, p in profiles.items()}
    return {"scaling": cfg.flora.scaling, "profiles": profiles, "per_round": per_round_totals(profiles, clients),
            "round_1": per_round_totals(round_one, clients),
            "per_round_is": "a round after the first (round 1 sends no merged update: round_1)",
            "stacked_alternative": {"expected_stacked_rank": clients * mean_rank,
                                    "downlink_lora_bytes_per_client": stacked_bytes(strategy, clients * mean_rank)}}
