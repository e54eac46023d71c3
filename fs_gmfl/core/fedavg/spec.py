"""FedIT and FFA-LoRA as registered methods (GMFL bases: :func:`fs_gmfl.methods.build_method` wraps them)."""

from __future__ import annotations

from fs_gmfl.core.fedavg.client import LoraClient, processed_samples_cap
from fs_gmfl.core.fedavg.strategy import LoraFedAvg
from fs_gmfl.core.fedavg.estimate import estimate_lora_fedavg
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec


def build_lora_fedavg(ctx: MethodContext) -> Method:
    """FedIT or FFA-LoRA; ``gmfl.downlink: stateful_sync`` (a FedAvg feature) makes clients cache the adapter."""
    cfg, variant = ctx.cfg, ctx.cfg.method
    stateful = cfg.gmfl.use and cfg.gmfl.downlink == "stateful_sync"
    strategy = LoraFedAvg(ctx.initial, variant=variant, downlink="stateful_sync" if stateful else "stateless")
    cap = processed_samples_cap(cfg.federate.client_weight, batch_size=cfg.dataloader.batch_size,
                                local_steps=cfg.train.local_update_steps, batch_or_epoch=cfg.train.batch_or_epoch)
    return Method(strategy, LoraClient(variant, stateful=stateful, samples_cap=cap))


FEDIT = MethodSpec(
    name="fedit", aliases=("fedavg",), build=build_lora_fedavg, gmfl_base=True, gmfl_stateful_sync=True,
    client_weighting=True,
    summary="FedAvg of the LoRA factors A and B (FedIT); 'fedavg' is an alias",
    estimate=estimate_lora_fedavg,
    example_overrides=("federate.method", "fedit"))
FFA_LORA = MethodSpec(
    name="ffa_lora", build=build_lora_fedavg, gmfl_base=True, gmfl_stateful_sync=True, client_weighting=True,
    summary="FedAvg of the LoRA B factors, A frozen at its initial value (FFA-LoRA)",
    estimate=estimate_lora_fedavg,
    example_overrides=("federate.method", "ffa_lora"))
SPECS = [FEDIT, FFA_LORA]
