"""HAFL bytes per round without weights (``fs-gmfl comm``): one profile per client profile."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fs_gmfl.core.estimate import breakdown, per_round_totals
from fs_gmfl.core.gmfl.estimate import unit_savings
from fs_gmfl.core.hafl.strategy import HAFLStrategy
from fs_gmfl.core.hafl.wire import build_uplink
from fs_gmfl.core.message import Message
from fs_gmfl.core.registry import EstimateContext


def estimate_hafl(ctx: EstimateContext) -> dict[str, Any]:
    """HAFL: per profile, the real round-1 downlink and the uplink of its n_k components; shares from the assignment.

    Per-round figures are expectations over uniform client sampling
    (``clients x sum(share x bytes)``), e.g. 52.17 MiB of fp32 LoRA uplink for
    GPT-2 Large with the paper's 33/33/34 profiles.
    """
    cfg, initial = ctx.cfg, ctx.initial
    method = ctx.build_method()
    strategy = getattr(method.strategy, "base", method.strategy)  # the HAFL strategy, also when GMFL wraps it
    assert isinstance(strategy, HAFLStrategy)
    profiles: dict[str, dict[str, Any]] = {}
    for row in method.info["profiles"]:
        if not row["client_ids"]:
            continue
        cid = row["client_ids"][0]
        downlink = strategy.configure_round(1, [cid])[cid]
        factors = {**downlink.tensors, **{k: initial[k] for k in strategy.head_keys}}
        selected = strategy.pending[cid]

        def uplink(pairs: tuple[Any, ...], factors: dict[str, Tensor] = factors,
                   selected: Tensor = selected) -> Message:
            rows = [strategy.pairs.index(p) for p in pairs]
            return build_uplink(factors, pairs, selected[rows], rank=strategy.rank, num_samples=1,
                                truncated=cfg.hafl.scheme == "truncation")

        profiles[row["name"]] = {"clients_share": row["clients"] / cfg.federate.client_num,
                                 "trained_components": row["trained_components"],
                                 "uplink": breakdown(uplink(tuple(strategy.pairs))), "downlink": breakdown(downlink),
                                 **unit_savings(cfg, strategy.pairs, uplink)}
    return {"scheme": cfg.hafl.scheme, "aggregation": cfg.hafl.aggregation, "profiles": profiles,
            "per_round": per_round_totals(profiles, cfg.federate.clients_per_round())}
