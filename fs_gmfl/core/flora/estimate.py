"""FLoRA's bytes per round without weights (``fs-gmfl comm``): one profile per rank profile.

Uplink: the client's rank-r_k factors, the head and the sample count.
Downlink, by ``flora.downlink``:

* ``dense``: the dense merged update of every adapted module (from round 2
  on; round 1 has none), the head, the seed and the rank; the estimate also
  reports what one round's stacked factors would cost instead
  (``stacked_alternative``; not sent);
* ``stacked``: the stacked factors of the rounds merged since the client's
  last round, or the dense update when smaller: in expectation over uniform
  client sampling in the steady state (every client met before), a client
  comes back after ``g`` rounds with probability ``q (1 - q)^(g - 1)``
  (``q`` = clients per round / clients) and receives
  ``min(dense, g x one round's stacks)``, one round's stacked rank being its
  expected value (clients per round x the mean rank).
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
    """fp32 bytes of stacked factors of total rank ``stacked_rank``: ``4 R sum_m (d_in + d_out)``."""
    return 4 * stacked_rank * sum(m.d_in + m.d_out for m in strategy.modules)


def expected_catch_up_bytes(dense: float, one_round: float, q: float) -> float:
    """``E[min(dense, G one_round)]`` with ``G`` geometric on ``{1, 2, ...}`` with success probability ``q``."""
    if one_round <= 0:
        return 0.0
    expected, g, survive = 0.0, 1, 1.0  # survive = P(G >= g)
    while g * one_round < dense and survive > 1e-12:
        expected += survive * q * g * one_round
        survive *= 1 - q
        g += 1
    return expected + survive * dense


def stacked_downlink(strategy: FLoRAStrategy, sample: Message, catch_up: float) -> dict[str, float]:
    """The breakdown of a stacked-mode downlink: ``sample``'s head and control bytes plus ``catch_up`` bytes."""
    parts = {k: float(v) for k, v in breakdown(sample).items()}
    parts["other_bytes"] = catch_up
    parts["bytes"] = parts["lora_bytes"] + parts["head_bytes"] + catch_up + parts["control_bytes"]
    return parts


def estimate(ctx: EstimateContext) -> dict[str, Any]:
    """Per rank profile: the downlink of a round after the first and the rank-r_k uplink; round 1 apart."""
    cfg = ctx.cfg
    strategy, profile_of = strategy_for(cfg, ctx.initial, ctx.meta_model())
    clients, total = cfg.federate.clients_per_round(), cfg.federate.client_num
    first, profiles, sample_client = {}, {}, {}
    for index, profile in enumerate(cfg.flora.profiles or [None]):
        ids = [c for c, p in enumerate(profile_of) if p == (index if profile is not None else -1)]
        if ids:
            name = profile.label() if profile is not None else "full"
            first[name], sample_client[name] = breakdown(strategy.configure_round(1, ids[:1])[ids[0]]), ids[0]
            profiles[name] = {"clients_share": len(ids) / total, "rank": strategy.ranks[ids[0]],
                              "uplink": breakdown(uplink_of_rank(strategy, strategy.ranks[ids[0]]))}
    mean_rank = sum(p["clients_share"] * p["rank"] for p in profiles.values())
    one_round = stacked_bytes(strategy, clients * mean_rank)
    dense = strategy.dense_bytes()
    strategy.rounds_merged = 1  # a round after the first: something has been merged
    for name, p in profiles.items():
        cid = sample_client[name]
        sample = strategy.configure_round(2, [cid])[cid]
        p["downlink"] = (breakdown(sample) if cfg.flora.downlink == "dense"
                         else stacked_downlink(strategy, sample, expected_catch_up_bytes(dense, one_round,
                                                                                         clients / total)))
    round_one = {name: {**p, "downlink": first[name]} for name, p in profiles.items()}
    out = {"scaling": cfg.flora.scaling, "downlink": cfg.flora.downlink, "profiles": profiles,
           "per_round": per_round_totals(profiles, clients), "round_1": per_round_totals(round_one, clients),
           "per_round_is": "a round after the first (round 1 sends no merged update: round_1)",
           "dense_update_bytes": dense, "one_round_stacked_rank": clients * mean_rank,
           "one_round_stacked_bytes": one_round}
    if cfg.flora.downlink == "stacked":
        out["per_round_is"] += "; stacked catch-up in expectation over uniform sampling, every client met before"
    return out
