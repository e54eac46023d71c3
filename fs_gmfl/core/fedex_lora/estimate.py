"""FedEx-LoRA's bytes per round without weights (``fs-gmfl comm``), from its own downlink on meta tensors.

Uplink: FedIT's (the LoRA factors, the head, the sample count). Downlink:
FedIT's whole adapter plus, per adapted module, its base weight with the
residuals folded in (``d_out x d_in`` entries, reported as ``other_bytes``):
FedEx-LoRA's own cost (spec GMFL.md section 7.2). With GMFL the schedule of
FedIT's units (one LoRA tensor each) is added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fs_gmfl.core.estimate import breakdown, per_round_totals, uplink_message
from fs_gmfl.core.fedex_lora.strategy import FedExLoraStrategy
from fs_gmfl.core.fedex_lora.wire import base_weights, residual_targets
from fs_gmfl.core.gmfl.estimate import schedule_bytes
from fs_gmfl.core.message import tensor_bytes

if TYPE_CHECKING:
    from fs_gmfl.core.registry import EstimateContext


def meta_strategy(ctx: EstimateContext) -> FedExLoraStrategy:
    """The strategy a host would build, on the meta adapter and a meta backbone's base weights."""
    model = ctx.meta_model()
    targets = residual_targets(model, ctx.initial)
    return FedExLoraStrategy(ctx.initial, targets, base_weights(model, targets))


def estimate(ctx: EstimateContext) -> dict[str, Any]:
    """Bytes per client and round (``profiles``) and of the round's clients (``per_round``); ``residual_params``
    is the downlink's extra ``sum d_out x d_in``."""
    strategy = meta_strategy(ctx)
    downlink = breakdown(strategy.configure_round(1, [0])[0])
    uplink = breakdown(uplink_message(ctx.initial, strategy.trainable_keys()))
    profiles = {"default": {"clients_share": 1.0, "uplink": uplink, "downlink": downlink}}
    out: dict[str, Any] = {"residual_params": sum(w.numel() for w in strategy.base_weights.values()),
                           "profiles": profiles,
                           "per_round": per_round_totals(profiles, ctx.cfg.federate.clients_per_round())}
    if ctx.cfg.gmfl.use:
        units = strategy.mask_units().values()
        out["gmfl"] = schedule_bytes(ctx.cfg, [sum(tensor_bytes(ctx.initial[k]) for k in keys) for keys in units],
                                     uplink["bytes"])
    return out
