"""FedIT / FFA-LoRA bytes per round without weights (``fs-gmfl comm``), and GMFL's schedule when it wraps them."""

from __future__ import annotations

from typing import Any

from fs_gmfl.core.estimate import breakdown, per_round_totals, uplink_message
from fs_gmfl.core.gmfl.estimate import schedule_bytes
from fs_gmfl.core.message import tensor_bytes
from fs_gmfl.core.registry import EstimateContext


def estimate_lora_fedavg(ctx: EstimateContext) -> dict[str, Any]:
    """Bytes per client per round of any method whose strategy is a ``LoraFedAvg`` (FedIT, FFA-LoRA, ...).

    The downlink is the strategy's own; the uplink holds the tensors the
    strategy expects clients to train. With GMFL the frozen tensors depend on
    training; each schedule block reports the uplink if the smallest or the
    largest mask units were the frozen ones (equal when all units have the
    same size).
    """
    cfg, initial = ctx.cfg, ctx.initial
    method = ctx.build_method()
    strategy = getattr(method.strategy, "base", method.strategy)  # the FedAvg strategy, also when GMFL wraps it
    downlink = breakdown(method.strategy.configure_round(1, [0])[0])
    uplink = breakdown(uplink_message(initial, strategy.base_trainable))
    profiles = {"default": {"clients_share": 1.0, "uplink": uplink, "downlink": downlink}}
    out: dict[str, Any] = {"profiles": profiles,
                           "per_round": per_round_totals(profiles, cfg.federate.clients_per_round())}
    if cfg.gmfl.use:
        unit_bytes = [sum(tensor_bytes(initial[k]) for k in keys) for keys in strategy.mask_units().values()]
        out["gmfl"] = schedule_bytes(cfg, unit_bytes, uplink["bytes"])
    return out
