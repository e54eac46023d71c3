"""FLoRA as a registered method: stacking of heterogeneous-rank LoRA modules merged into the base weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fs_gmfl.core.adapter import LORA_A, LORA_B, kind_of, load_model_tensors
from fs_gmfl.core.fedavg.client import processed_samples_cap
from fs_gmfl.core.flora.client import FLoRAClient
from fs_gmfl.core.flora.config import FLoRAConfig
from fs_gmfl.core.flora.estimate import estimate
from fs_gmfl.core.flora.strategy import strategy_for
from fs_gmfl.core.hafl.profiles import profile_report
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec

if TYPE_CHECKING:
    from fs_gmfl.config.schema import RunConfig


def build(ctx: MethodContext) -> Method:
    """FLoRA on the host's model: the strategy, a client sharing its ``W0``, and the global model's loader."""
    cfg = ctx.cfg
    strategy, profile_of = strategy_for(cfg, ctx.initial, ctx.host_model())
    cap = processed_samples_cap(cfg.federate.client_weight, batch_size=cfg.dataloader.batch_size,
                                local_steps=cfg.train.local_update_steps, batch_or_epoch=cfg.train.batch_or_epoch)
    head_keys = [k for k in ctx.initial if kind_of(k) not in (LORA_A, LORA_B)]
    client = FLoRAClient(strategy.modules, strategy.base, head_keys, rank=cfg.lora.r, alpha=cfg.lora.lora_alpha,
                         config=cfg.flora, init=cfg.lora.init_lora_weights, samples_cap=cap,
                         model_provider=ctx.model_provider)
    info = {"scaling": cfg.flora.scaling, "downlink": cfg.flora.downlink, "merged_modules": len(strategy.modules),
            "profiles": profile_report(cfg.flora.rank_profiles(), profile_of, cfg.lora.r)}
    return Method(strategy, client, info,
                  load_global=lambda target: load_model_tensors(target, strategy.global_adapter()),
                  clients_reset=strategy.clients_reset)


def check_run(cfg: RunConfig) -> None:
    """The rank profiles must fit the LoRA rank and the clients."""
    cfg.flora.check_run(rank=cfg.lora.r, client_num=cfg.federate.client_num)


SPECS = [MethodSpec(
    name="flora", build=build, config_section="flora", config_class=FLoRAConfig, check_config=check_run,
    estimate=estimate, client_weighting=True,
    summary="stacking of the clients' (heterogeneous-rank) LoRA modules, merged into the base weights each round, "
            "fresh LoRA modules every round (FLoRA)",
    gmfl_refusal="False with federate.method 'flora': FLoRA re-creates its LoRA modules every round (spec 7.5), so "
                 "no adapter tensor persists across rounds for GMFL to rank and freeze",
    example_overrides=("federate.method", "flora"))]
