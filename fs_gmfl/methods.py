"""Building the method a run configuration selects; both hosts go through :func:`build_method`.

Methods declare themselves in :mod:`fs_gmfl.core.registry` (one ``spec.py``
per method folder, or an entry point of a plug-in package), so a method that
is registered runs in the embedded simulator and under FederatedScope alike.
"""

from __future__ import annotations

import torch

from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.gmfl.wrapper import wrap_method
from fs_gmfl.core.protocol import Strategy
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec, register_method, spec_of
from fs_gmfl.core.uplinks import UplinkPolicy

__all__ = ["Method", "MethodContext", "MethodSpec", "build_method", "configure_uplinks", "register_method",
           "uplink_dtype"]


def build_method(ctx: MethodContext) -> Method:
    """Build the method selected by ``ctx.cfg``, wrapped by GMFL when ``gmfl.use`` is set."""
    method = spec_of(ctx.cfg.method).builder()(ctx)
    if ctx.cfg.gmfl.use:
        method = wrap_method(method, ctx.cfg)
    configure_uplinks(method.strategy, ctx.cfg)
    return method


def configure_uplinks(strategy: Strategy, cfg: RunConfig) -> None:
    """Set the strategy's uplink bounds from ``federate.*`` (hosts add shard sizes they know).

    A strategy without an :class:`~fs_gmfl.core.uplinks.UplinkPolicy` (a plug-in's own) is left alone.
    """
    policy = getattr(strategy, "policy", None)
    if not isinstance(policy, UplinkPolicy):
        return
    fed = cfg.federate
    policy.max_samples = fed.max_sample_count
    policy.max_update_ratio = fed.max_update_ratio
    policy.update_rms_floor = fed.update_rms_floor
    policy.wire_dtype = uplink_dtype(cfg)


def uplink_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype clients train and upload floating tensors in: ``train.half_dtype`` under is_enable_half, else fp32
    (autocast keeps fp32 weights, so fp32 uplinks)."""
    return getattr(torch, cfg.train.half_dtype) if cfg.train.is_enable_half else torch.float32
