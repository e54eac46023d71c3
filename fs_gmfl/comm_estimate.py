"""Per-round communication estimates without weights (``fs-gmfl comm``).

The model is built on the meta device, so a GPT-2-Large- or LLaMA-7B-shaped
configuration is costed in seconds without downloading anything. Each method
estimates its own bytes (:attr:`~fs_gmfl.core.registry.MethodSpec.estimate`, a
function in the method's folder, with the shared arithmetic of
:mod:`fs_gmfl.core.estimate`); this module builds what every estimator
receives (:class:`~fs_gmfl.core.registry.EstimateContext`) and the common part
of the result (model, method, targets, adapter shape). The result is plain JSON.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.adapter import HEAD, LORA_A, LORA_B, adapter_parameters, kind_of
from fs_gmfl.core.registry import EstimateContext, method_specs, spec_of
from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.common.corpus import declared_num_labels
from fs_gmfl.hosts.common.models import build_backbone
from fs_gmfl.methods import MethodContext, build_method


def estimable_methods() -> list[str]:
    """Names of the registered methods that have a byte estimator."""
    return [spec.name for spec in method_specs() if spec.estimate is not None]


def adapter_summary(initial: dict[str, Tensor]) -> dict[str, Any]:
    """Counts of LoRA tensors and parameters, head parameters, element size."""
    lora = [k for k in initial if kind_of(k) in (LORA_A, LORA_B)]
    head = [k for k in initial if kind_of(k) == HEAD]
    any_tensor = next(iter(initial.values()))
    return {"lora_tensors": len(lora), "lora_params": sum(initial[k].numel() for k in lora),
            "head_params": sum(initial[k].numel() for k in head), "element_bytes": any_tensor.element_size(),
            "dtype": str(any_tensor.dtype).replace("torch.", "")}


def estimated_num_labels(cfg: RunConfig) -> int:
    """Head classes: ``model.num_labels``, else the packaged dataset's, else 2 (user files are not read)."""
    return cfg.model.num_labels or declared_num_labels(cfg.data) or 2


def estimate_context(cfg: RunConfig, initial: dict[str, Tensor]) -> EstimateContext:
    """What ``cfg``'s estimator receives: the meta adapter ``initial``, the method built on it, meta backbones."""
    return EstimateContext(cfg, initial, build_method=lambda: build_method(MethodContext(cfg, initial)),
                           meta_model=lambda: build_backbone(cfg, estimated_num_labels(cfg), meta=True).model)


def estimate(cfg: RunConfig) -> dict[str, Any]:
    """Build ``cfg``'s model on the meta device and estimate bytes per round.

    Raises:
        ConfigError: the method has no byte estimator.
    """
    estimator = spec_of(cfg.method).estimator()
    if estimator is None:
        raise ConfigError("federate.method", cfg.federate.method, "a method with a byte estimator for 'fs-gmfl "
                          f"comm': one of {', '.join(repr(name) for name in estimable_methods())}")
    num_labels = estimated_num_labels(cfg)
    backbone = build_backbone(cfg, num_labels, meta=True)
    initial = {k: p.detach() for k, p in adapter_parameters(backbone.model).items()}
    result = {"model": cfg.model.type, "method": cfg.method + ("+gmfl" if cfg.gmfl.use else ""),
              "target_modules": backbone.target_modules, "num_labels": num_labels,
              "adapter": adapter_summary(initial)}
    result.update(estimator(estimate_context(cfg, initial)))
    return result
