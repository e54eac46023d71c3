"""FedHFT bytes per round without weights (``fs-gmfl comm``): one profile per resource level."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fs_gmfl.core.estimate import breakdown, per_round_totals
from fs_gmfl.core.fedhft.ops import kept_row_count
from fs_gmfl.core.fedhft.wire import downlink_message, uplink_message
from fs_gmfl.core.gmfl.estimate import unit_savings
from fs_gmfl.core.message import Message
from fs_gmfl.core.registry import EstimateContext


def estimate_fedhft(ctx: EstimateContext) -> dict[str, Any]:
    """FedHFT: one profile per resource level, from the same message builders as real runs.

    Uplink of a level-s client: full ``A``, ``k = max(1, round(s d_out))``
    rows of ``B`` and their encoding, the head and the sample count;
    downlink: the rank-r personalised factors (same shapes as A and B), the
    head, the level and a seed. Round 1's downlink carries the head only.
    """
    cfg, initial = ctx.cfg, ctx.initial
    method = ctx.build_method()
    levels = method.strategy.levels
    layout = method.strategy.layout
    head = {k: initial[k] for k in layout.head_keys}
    factors = {k: initial[k] for p in layout.pairs for k in (p.a_key, p.b_key)}
    profiles: dict[str, dict[str, Any]] = {}
    for level, ratio in enumerate(cfg.fedhft.keep_ratios):
        kept = {m: kept_row_count(ratio, shape[0]) for m, shape in layout.shapes.items()}

        def uplink(pairs: tuple[Any, ...], kept: dict[str, int] = kept) -> Message:
            a = {p.a_key: initial[p.a_key] for p in pairs}
            return uplink_message(dataclasses.replace(layout, pairs=pairs), a,
                                  {p.b_key: initial[p.b_key][: kept[p.module]] for p in pairs},
                                  {p.module: torch.arange(kept[p.module]) for p in pairs}, head, 1)

        profiles[f"level_{level}"] = {
            "clients_share": levels.count(level) / len(levels), "keep_ratio": ratio,
            "kept_rows": sum(kept.values()), "uplink": breakdown(uplink(layout.pairs)),
            "downlink": breakdown(downlink_message(head, factors, level=level, seed=0)),
            **unit_savings(cfg, layout.pairs, uplink)}
    return {"profiles": profiles, "per_round": per_round_totals(profiles, cfg.federate.clients_per_round()),
            "first_round_downlink": breakdown(downlink_message(head, None, level=0, seed=0))}
