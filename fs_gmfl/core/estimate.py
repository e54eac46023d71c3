"""The byte arithmetic every method's estimator shares (``fs-gmfl comm``).

A method's estimator lives in its own folder (``fs_gmfl/core/<method>/estimate.py``) and is named by its
spec (:attr:`~fs_gmfl.core.registry.MethodSpec.estimate`). It receives an
:class:`~fs_gmfl.core.registry.EstimateContext` (the configuration, the adapter on the meta device, the method
as a host builds it, a backbone on the meta device) and returns plain JSON, by convention ``profiles`` (per kind
of client: its share of the clients, the :func:`breakdown` of its uplink and downlink) and ``per_round``
(:func:`per_round_totals`). Messages are built by the method's own wire code on meta tensors, so byte counts
are ``numel * element_size`` of what would be sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from fs_gmfl.core.adapter import HEAD, LORA_A, LORA_B, kind_of
from fs_gmfl.core.message import Message, samples_tensor, tensor_bytes
from fs_gmfl.core.targets import TargetLayer, default_targets, resolve_targets, target_weights

if TYPE_CHECKING:
    from fs_gmfl.core.registry import EstimateContext

MIB = 1024 * 1024
#: the parts of a message :func:`breakdown` reports, each in bytes.
PARTS = ("lora_bytes", "head_bytes", "other_bytes", "control_bytes", "bytes")


def breakdown(message: Message) -> dict[str, int]:
    """Bytes of a message by kind: ``lora_bytes``, ``head_bytes``, ``other_bytes``, ``control_bytes``, ``bytes``."""
    out = {"lora_bytes": 0, "head_bytes": 0, "other_bytes": 0}
    for key, t in message.tensors.items():
        kind = kind_of(key)
        out["lora_bytes" if kind in (LORA_A, LORA_B) else "head_bytes" if kind == HEAD else "other_bytes"] += \
            tensor_bytes(t)
    out["control_bytes"] = message.control_bytes
    out["bytes"] = message.nbytes
    return out


def uplink_message(initial: Mapping[str, Tensor], keys: Sequence[str]) -> Message:
    """The uplink a client training ``keys`` sends (tensors plus sample count)."""
    return Message({k: initial[k] for k in keys}, {"num_samples": samples_tensor(1)})


def per_round_totals(profiles: dict[str, dict[str, Any]], clients: int) -> dict[str, Any]:
    """Expected bytes of all ``clients`` sampled clients of a round, profiles weighted by their share."""
    out: dict[str, Any] = {"clients": clients}
    for direction in ("uplink", "downlink"):
        for part in PARTS:
            value = clients * sum(p["clients_share"] * p[direction][part] for p in profiles.values())
            out[f"{direction}_{part}"] = value
        out[f"{direction}_mib"] = out[f"{direction}_bytes"] / MIB
        out[f"{direction}_lora_mib"] = out[f"{direction}_lora_bytes"] / MIB
    return out


def affine_bytes(build: Callable[[int], Message], x: float) -> dict[str, float]:
    """Bytes of a message whose size is affine in a count, at a fractional count ``x`` (from two real messages)."""
    one, two = breakdown(build(1)), breakdown(build(2))
    return {k: one[k] + (two[k] - one[k]) * (x - 1) for k in one}


def head_of(initial: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The head tensors of an adapter."""
    return {k: v for k, v in initial.items() if kind_of(k) == HEAD}


def meta_targets(ctx: EstimateContext, requested: list[str], key: str) -> tuple[list[TargetLayer],
                                                                                dict[str, Tensor], list[str]]:
    """Targeted layers, their weights and the target list of a fresh meta-device backbone (methods training
    backbone weights)."""
    model = ctx.meta_model()
    layers = resolve_targets(model, requested, key=key)
    weights = {k: w.detach() for k, w in target_weights(model, layers).items()}
    return layers, weights, list(requested) or default_targets(model)


def trained_summary(weights: Mapping[str, Tensor], head: Mapping[str, Tensor]) -> dict[str, Any]:
    """Parameter counts of trained backbone weights and head, and their element size and dtype."""
    any_tensor = next(iter(weights.values()))
    return {"targeted_params": sum(w.numel() for w in weights.values()),
            "head_params": sum(v.numel() for v in head.values()), "element_bytes": any_tensor.element_size(),
            "dtype": str(any_tensor.dtype).replace("torch.", "")}
