"""Federated full fine-tuning bytes per round without weights (``fs-gmfl comm``)."""

from __future__ import annotations

from typing import Any

from fs_gmfl.core.estimate import breakdown, head_of, meta_targets, per_round_totals, trained_summary, uplink_message
from fs_gmfl.core.registry import EstimateContext


def estimate_fft(ctx: EstimateContext) -> dict[str, Any]:
    """Federated full fine-tuning: the targeted weights and the head, each way (no sample count downwards)."""
    cfg = ctx.cfg
    _, weights, targets = meta_targets(ctx, cfg.fft.target_modules, "fft.target_modules")
    head = head_of(ctx.initial)
    trained = {**weights, **head}
    message = breakdown(uplink_message(trained, list(trained)))
    down = dict(message, control_bytes=0, bytes=message["bytes"] - message["control_bytes"])
    profiles = {"default": {"clients_share": 1.0, "uplink": message, "downlink": down}}
    return {"target_modules": targets, "adapter": trained_summary(weights, head), "profiles": profiles,
            "per_round": per_round_totals(profiles, cfg.federate.clients_per_round())}
