"""LoRA-A2 (base, spec GMFL.md section 7.4) as a registered method: FedIT's FedAvg with alternating freeze; a GMFL
base whose mask is re-computed after every round (:mod:`fs_gmfl.core.lora_a2.masking`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fs_gmfl.config.fields import fail
from fs_gmfl.core.fedavg.client import LoraClient, processed_samples_cap
from fs_gmfl.core.lora_a2.client import LoraA2Client
from fs_gmfl.core.lora_a2.estimate import estimate
from fs_gmfl.core.lora_a2.strategy import LoraA2FedAvg
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec

if TYPE_CHECKING:
    from fs_gmfl.config.schema import RunConfig


def build(ctx: MethodContext) -> Method:
    """FedIT's client (weighted as ``federate.client_weight`` says) wrapped, and FedIT's strategy restricted."""
    cfg = ctx.cfg
    cap = processed_samples_cap(cfg.federate.client_weight, batch_size=cfg.dataloader.batch_size,
                                local_steps=cfg.train.local_update_steps, batch_or_epoch=cfg.train.batch_or_epoch)
    return Method(LoraA2FedAvg(ctx.initial), LoraA2Client(LoraClient("fedit", samples_cap=cap)),
                  {"parity": "odd rounds train lora_B, even rounds lora_A"})


def check_run(cfg: RunConfig) -> None:
    """Under GMFL the masks are recomputed after every round from that round's update (spec 7.4), so
    ``gmfl.stat`` must be the single-round statistic."""
    if cfg.gmfl.use and cfg.gmfl.stat != "last_round_l1":
        fail(cfg, "gmfl.stat", cfg.gmfl.stat, "'last_round_l1' with federate.method 'lora_a2' (its GMFL masks are "
             "recomputed after every round from that round's update)")


SPECS = [MethodSpec(
    name="lora_a2", build=build, estimate=estimate, client_weighting=True,
    summary="FedIT with alternating freeze: odd rounds train and average lora_B, even rounds lora_A (LoRA-A2 base, "
            "no adaptive rank)",
    gmfl_base=True, gmfl_masking="fs_gmfl.core.lora_a2.masking:AlternatingMasking", check_config=check_run,
    example_overrides=("federate.method", "lora_a2"))]
