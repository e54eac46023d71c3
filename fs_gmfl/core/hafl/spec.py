"""HAFL as a registered method: builder and configuration rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fs_gmfl.core.hafl.client import HAFLClient
from fs_gmfl.core.hafl.config import HAFLConfig
from fs_gmfl.core.hafl.profiles import client_capacities, profile_report
from fs_gmfl.core.hafl.strategy import HAFLStrategy
from fs_gmfl.core.hafl.estimate import estimate_hafl
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec

if TYPE_CHECKING:
    from fs_gmfl.config.schema import RunConfig


def build_hafl(ctx: MethodContext) -> Method:
    """HAFL (ITALoRA / IFALoRA / IFZLoRA / HomLoRA): seeded client profiles, strategy and client."""
    cfg, h = ctx.cfg, ctx.cfg.hafl
    r_max = cfg.lora.r
    profile_of, trained = client_capacities(h, num_clients=cfg.federate.client_num, r_max=r_max, seed=cfg.seed)
    strategy = HAFLStrategy(ctx.initial, h, trained=trained, lr=cfg.train.optimizer.lr)
    client = HAFLClient(h.scheme, rank=r_max, alpha=cfg.lora.lora_alpha, scaling=h.scaling, train_head=h.train_head,
                        model_provider=ctx.model_provider)
    info = {"scheme": h.scheme, "aggregation": h.aggregation, "r_max": r_max,
            "profiles": profile_report(h, profile_of, r_max)}
    return Method(strategy, client, info)


def check_run(cfg: RunConfig) -> None:
    """The client profiles must fit the LoRA rank and the clients."""
    cfg.hafl.check_run(r_max=cfg.lora.r, client_num=cfg.federate.client_num)


def advise(cfg: RunConfig) -> list[str]:
    """Pre-flight warnings: HAFL without client profiles is homogeneous LoRA."""
    warning = cfg.hafl.homogeneity_warning(cfg.lora.r)
    return [warning] if warning else []


HAFL = MethodSpec(
    name="hafl", build=build_hafl, config_section="hafl", config_class=HAFLConfig, check_config=check_run,
    advise_config=advise,
    gmfl_base=True,
    summary="heterogeneous rank-1 truncation or freezing with adaptive rank-1 aggregation (HAFL)",
    estimate=estimate_hafl,
    example_overrides=("federate.method", "hafl"))
SPECS = [HAFL]
