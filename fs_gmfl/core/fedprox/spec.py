"""FedProx as a registered method: FedIT's strategy and uplink, a proximal term in the clients' loss."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

from fs_gmfl.core.fedavg.spec import build_lora_fedavg
from fs_gmfl.core.fedprox.client import FedProxClient
from fs_gmfl.core.fedprox.config import FedProxConfig
from fs_gmfl.core.fedprox.estimate import estimate
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec

if TYPE_CHECKING:
    from fs_gmfl.config.schema import RunConfig


def as_fedit(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` that selects FedIT (everything else unchanged)."""
    fedit = copy.copy(cfg)
    fedit.federate = dataclasses.replace(cfg.federate, method="fedit")
    return fedit


def build(ctx: MethodContext) -> Method:
    """FedIT built from the same configuration, its client given the proximal term."""
    fedit = build_lora_fedavg(dataclasses.replace(ctx, cfg=as_fedit(ctx.cfg)))
    fedit.strategy.name = ctx.cfg.method
    return Method(fedit.strategy, FedProxClient(fedit.client, mu=ctx.cfg.fedprox.mu), {"mu": ctx.cfg.fedprox.mu})


SPECS = [MethodSpec(
    name="fedprox", build=build, config_section="fedprox", config_class=FedProxConfig, estimate=estimate,
    gmfl_base=True, gmfl_stateful_sync=True, client_weighting=True,
    summary="FedIT with FedProx's proximal term mu/2 ||w - w_global||^2 in the local loss (Li et al. 2020)",
    example_overrides=("federate.method", "fedprox", "fedprox.mu", "0.1"))]
