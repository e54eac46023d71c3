"""Targeted weight matrices: which backbone linear layers a full-weight method trains.

Methods that update backbone weights themselves (FedKRSO, federated full
fine-tuning) address each targeted layer by the ``named_parameters`` name of
its weight (``...attention.self.query.base_layer.weight`` when peft wraps the
layer, ``...attention.self.key.weight`` otherwise) and derive anything random
from a *canonical* layer key that does not depend on such wrappers
(``bert.encoder.layer.0.attention.self.query``), so every party that holds the
same backbone agrees on it.

Targets are module-name suffixes, as in peft: ``output.dense`` matches both
``attention.output.dense`` and the feed-forward ``output.dense`` of BERT.
Modules of the task head (peft ``modules_to_save`` / ``original_module``) and
of LoRA branches are never targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from fs_gmfl.errors import ConfigError

#: default targets per ``config.model_type``: every linear layer of the transformer blocks.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "xlm-roberta": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "phi": ["q_proj", "k_proj", "v_proj", "self_attn.dense", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "self_attention.dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "self_attention.dense", "dense_h_to_4h", "dense_4h_to_h"],
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"),
                    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}

_EXCLUDED_SEGMENTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout",
                      "modules_to_save", "original_module", "base_layer")
_WRAPPER_PREFIX = "base_model.model."


@dataclass(frozen=True)
class TargetLayer:
    """One targeted weight matrix.

    Attributes:
        name: ``named_parameters`` name of the weight in the host's model.
        key: canonical layer key (peft wrappers removed), used to derive per-layer randomness.
        module: module path of the layer that computes with the weight.
        d_out, d_in: the layer's output and input widths.
        transposed: the weight is stored ``d_in x d_out`` (transformers ``Conv1D``, GPT-2).
    """

    name: str
    key: str
    module: str
    d_out: int
    d_in: int
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the stored weight."""
        return (self.d_in, self.d_out) if self.transposed else (self.d_out, self.d_in)


def canonical_key(module_path: str) -> str:
    """Layer key without peft's ``base_model.model.`` prefix and ``.base_layer`` segments."""
    path = module_path[len(_WRAPPER_PREFIX):] if module_path.startswith(_WRAPPER_PREFIX) else module_path
    return ".".join(part for part in path.split(".") if part != "base_layer")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _base_linear(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The plain linear layer of ``module`` (peft's ``base_layer`` when wrapped), with its relative path."""
    if _is_linear(module):
        return "", module
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module) and _is_linear(base):
        return "base_layer", base
    return None


def _candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules a target may name: not the head (peft ``modules_to_save``) or a LoRA branch, not a ``base_layer``."""
    return {name: m for name, m in model.named_modules()
            if name and not any(seg in _EXCLUDED_SEGMENTS for seg in name.split("."))
            and not hasattr(m, "modules_to_save")}


def default_targets(model: nn.Module) -> list[str]:
    """The default target list of the model's architecture (empty if unknown)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(DEFAULT_TARGETS.get(str(model_type), []))


def resolve_targets(model: nn.Module, requested: Sequence[str], *, key: str) -> list[TargetLayer]:
    """The targeted layers of ``model``, in module order.

    Args:
        model: the host's model (possibly peft-wrapped, possibly on the meta device).
        requested: module-name suffixes; empty selects :data:`DEFAULT_TARGETS` for the architecture.
        key: the configuration key named in errors (``fedkrso.target_modules``).

    Raises:
        ConfigError: no default exists for the architecture, or a requested
            suffix matches no linear layer.
    """
    targets = list(requested) or default_targets(model)
    candidates = _candidate_modules(model)
    linear_suffixes = sorted({n.split(".")[-1] for n, m in candidates.items() if _base_linear(m) is not None})
    if not targets:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise ConfigError(key, list(requested), f"module names to train; no default is known for '{model_type}' "
                          f"(known: {', '.join(sorted(DEFAULT_TARGETS))}); set {key} to some of this backbone's "
                          f"linear modules: {', '.join(linear_suffixes)}")
    layers: list[TargetLayer] = []
    matched: set[str] = set()
    for name, module in candidates.items():
        hit = next((t for t in targets if name == t or name.endswith("." + t)), None)
        base = _base_linear(module) if hit else None
        if hit is None or base is None:
            continue
        matched.add(hit)
        rel, linear = base
        path = f"{name}.{rel}" if rel else name
        transposed = not isinstance(linear, nn.Linear)
        d_out, d_in = (linear.weight.shape[1], linear.weight.shape[0]) if transposed else tuple(linear.weight.shape)
        layers.append(TargetLayer(f"{path}.weight", canonical_key(path), path, int(d_out), int(d_in), transposed))
    missing = [t for t in targets if t not in matched]
    if missing:
        raise ConfigError(key, list(requested) or targets, f"linear modules of this backbone; '{missing[0]}' "
                          f"matches none (linear modules: {', '.join(linear_suffixes[:12])})")
    return layers


def target_weights(model: nn.Module, layers: Sequence[TargetLayer]) -> dict[str, nn.Parameter]:
    """The weight parameters of ``layers`` by name."""
    params = dict(model.named_parameters())
    missing = [layer.name for layer in layers if layer.name not in params]
    if missing:
        raise KeyError(f"model has no parameter '{missing[0]}'")
    return {layer.name: params[layer.name] for layer in layers}


def target_modules(model: nn.Module, layers: Sequence[TargetLayer]) -> dict[str, nn.Module]:
    """The (plain linear) modules of ``layers`` by weight name."""
    modules = dict(model.named_modules())
    return {layer.name: modules[layer.module] for layer in layers}


def disable_lora_branches(model: nn.Module) -> int:
    """Switch off every peft LoRA branch of ``model`` (the layers then compute their base output only).

    Methods that train backbone weights themselves do not use the host's LoRA
    adapter; switching it off saves its forward and backward work. The head
    (``modules_to_save``) is not a LoRA layer and stays active.

    Returns:
        The number of LoRA layers switched off.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    return len(layers)
