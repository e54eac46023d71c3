"""FedIT and FFA-LoRA as registered methods (GMFL may wrap either)."""

from __future__ import annotations

from fs_gmfl.core.fedavg.client import LoraClient, processed_samples_cap
from fs_gmfl.core.fedavg.strategy import LoraFedAvg, mask_candidate_keys
from fs_gmfl.core.gmfl import GlobalMasking
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec
from fs_gmfl.core.seeding import derive_seed


def build_lora_fedavg(ctx: MethodContext) -> Method:
    """FedIT or FFA-LoRA, wrapped by GMFL when ``gmfl.use`` is set."""
    cfg, variant = ctx.cfg, ctx.cfg.method
    masking, candidates = None, []
    if cfg.gmfl.use:
        candidates = mask_candidate_keys(list(ctx.initial), variant)
        masking = GlobalMasking(cfg.gmfl, candidates, seed=derive_seed(cfg.seed, "gmfl"))
    stateful = cfg.gmfl.use and cfg.gmfl.downlink == "stateful_sync"
    strategy = LoraFedAvg(ctx.initial, variant=variant, masking=masking,
                          downlink="stateful_sync" if stateful else "stateless")
    info = {"mask_candidates": len(candidates)} if cfg.gmfl.use else {}
    cap = processed_samples_cap(cfg.federate.client_weight, batch_size=cfg.dataloader.batch_size,
                                local_steps=cfg.train.local_update_steps, batch_or_epoch=cfg.train.batch_or_epoch)
    return Method(strategy, LoraClient(variant, candidates, stateful=stateful, samples_cap=cap), info)


FEDIT = MethodSpec(
    name="fedit", aliases=("fedavg",), build=build_lora_fedavg, gmfl_base=True,
    summary="FedAvg of the LoRA factors A and B (FedIT); 'fedavg' is an alias",
    estimate="fs_gmfl.comm_estimate:estimate_lora_fedavg",
    example_overrides=("federate.method", "fedit"))
FFA_LORA = MethodSpec(
    name="ffa_lora", build=build_lora_fedavg, gmfl_base=True,
    summary="FedAvg of the LoRA B factors, A frozen at its initial value (FFA-LoRA)",
    estimate="fs_gmfl.comm_estimate:estimate_lora_fedavg",
    example_overrides=("federate.method", "ffa_lora"))
SPECS = [FEDIT, FFA_LORA]
