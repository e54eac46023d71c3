"""FedEx-LoRA (spec GMFL.md section 7.2) as a registered method; a GMFL base (one LoRA tensor per mask unit)."""

from __future__ import annotations

from fs_gmfl.core.fedavg.client import LoraClient
from fs_gmfl.core.fedex_lora.client import FedExLoraClient
from fs_gmfl.core.fedex_lora.estimate import estimate
from fs_gmfl.core.fedex_lora.strategy import FedExLoraStrategy
from fs_gmfl.core.fedex_lora.wire import base_weights, residual_targets
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec


def build(ctx: MethodContext) -> Method:
    """The strategy over the host model's adapted modules (their ``W0`` and scaling), FedIT's client wrapped.

    The uplink's sample count is only screened (the means are uniform), so it is the shard size, uncapped.
    """
    model = ctx.host_model()
    targets = residual_targets(model, ctx.initial)
    strategy = FedExLoraStrategy(ctx.initial, targets, base_weights(model, targets))
    residual_params = sum(w.numel() for w in strategy.base_weights.values())
    return Method(strategy, FedExLoraClient(LoraClient("fedit")),
                  {"residual_modules": len(targets), "residual_params": residual_params})


SPECS = [MethodSpec(
    name="fedex_lora", build=build, estimate=estimate, gmfl_base=True,
    summary="FedEx-LoRA: uniform mean of A, B and the head; the residual (alpha/r)(mean B_k A_k - mean B mean A) "
            "folded into each adapted base weight, which the downlink carries (d_out x d_in per module)",
    example_overrides=("federate.method", "fedex_lora"))]
