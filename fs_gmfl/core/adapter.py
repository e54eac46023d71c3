"""Adapter keys: naming, classification and access on a peft model.

An *adapter key* is a peft parameter name with the adapter name removed, e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``
for the parameter ``...query.lora_A.default.weight``. Keys are identical on
every client and on the server, and identical to the keys of
``peft.get_peft_model_state_dict`` minus its ``base_model.model`` handling, so
they are what masks, scores and messages refer to.

Kinds of adapter tensors:

* ``lora_A`` (shape ``r x d_in``) and ``lora_B`` (``d_out x r``) of every
  adapted module; rank-1 component ``i`` is row ``i`` of A with column ``i``
  of B;
* ``head``: the task head peft keeps trainable (``modules_to_save``), which no
  method masks;
* ``other``: any other trainable parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LORA_A = "lora_A"
LORA_B = "lora_B"
HEAD = "head"
OTHER = "other"

_ADAPTER_SEGMENT = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|modules_to_save)\.([^.]+)\.")


def adapter_key(param_name: str, adapter_name: str = "default") -> str:
    """Adapter key of a peft parameter name (the adapter name removed)."""
    return param_name.replace(f".{adapter_name}.", ".", 1) if _ADAPTER_SEGMENT.search(param_name) else param_name


def kind_of(key: str) -> str:
    """Kind of an adapter key: ``lora_A``, ``lora_B``, ``head`` or ``other``."""
    if ".lora_A." in key:
        return LORA_A
    if ".lora_B." in key:
        return LORA_B
    if ".modules_to_save." in key:
        return HEAD
    return OTHER


def module_of(key: str) -> str:
    """The adapted module path of a LoRA key (``...query`` for ``...query.lora_A.weight``)."""
    for marker in (".lora_A.", ".lora_B."):
        if marker in key:
            return key.split(marker)[0]
    raise ValueError(f"'{key}' is not a LoRA key")


def lora_keys(keys: Iterable[str]) -> list[str]:
    """The LoRA (A and B) keys among ``keys``, order kept."""
    return [k for k in keys if kind_of(k) in (LORA_A, LORA_B)]


@dataclass(frozen=True)
class LoraPair:
    """The two factor keys of one adapted module."""

    module: str
    a_key: str
    b_key: str


def lora_pairs(keys: Iterable[str]) -> list[LoraPair]:
    """Group LoRA keys into (A, B) pairs per module, in first-seen order."""
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    order: list[str] = []
    for k in keys:
        kind = kind_of(k)
        if kind not in (LORA_A, LORA_B):
            continue
        mod = module_of(k)
        if mod not in a_keys and mod not in b_keys:
            order.append(mod)
        (a_keys if kind == LORA_A else b_keys)[mod] = k
    missing = [m for m in order if m not in a_keys or m not in b_keys]
    if missing:
        raise ValueError(f"LoRA modules without both factors: {missing[:3]}")
    return [LoraPair(m, a_keys[m], b_keys[m]) for m in order]


def adapter_parameters(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """All adapter parameters of a peft model by adapter key (LoRA factors and head).

    Parameters of the frozen backbone are excluded whatever their
    ``requires_grad``; the result depends only on the model's structure, so
    it is stable when methods freeze or unfreeze tensors.
    """
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if f".{adapter_name}." not in name or not _ADAPTER_SEGMENT.search(name):
            continue
        if ".original_module." in name:
            continue
        params[adapter_key(name, adapter_name)] = p
    return params


def adapter_state(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """A detached copy of every adapter tensor of ``model`` by adapter key."""
    return {k: p.detach().clone() for k, p in adapter_parameters(model, adapter_name).items()}


@torch.no_grad()
def load_adapter_tensors(model: nn.Module, tensors: Mapping[str, Tensor], adapter_name: str = "default") -> None:
    """Copy ``tensors`` into the matching adapter parameters of ``model``.

    Raises:
        KeyError: a key is not an adapter key of ``model``.
        ValueError: a tensor's shape differs from the parameter's.
    """
    params = adapter_parameters(model, adapter_name)
    for key, value in tensors.items():
        if key not in params:
            raise KeyError(f"'{key}' is not an adapter tensor of this model")
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"'{key}' has shape {tuple(value.shape)}, the model expects {tuple(params[key].shape)}")
        params[key].copy_(value.to(params[key].dtype))


def model_tensor_map(model: nn.Module, keys: Iterable[str], adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """Parameters of ``model`` for ``keys``: adapter keys, or plain parameter names for other tensors.

    Methods that change backbone weights (full fine-tuning, merged adapters)
    address them by their ``named_parameters`` name.

    Raises:
        KeyError: a key names neither an adapter tensor nor a parameter.
    """
    adapters = adapter_parameters(model, adapter_name)
    named: dict[str, nn.Parameter] | None = None
    out: dict[str, nn.Parameter] = {}
    for key in keys:
        if key in adapters:
            out[key] = adapters[key]
            continue
        if named is None:
            named = dict(model.named_parameters())
        if key not in named:
            raise KeyError(f"'{key}' is neither an adapter tensor nor a parameter of this model")
        out[key] = named[key]
    return out


@torch.no_grad()
def load_model_tensors(model: nn.Module, tensors: Mapping[str, Tensor], adapter_name: str = "default") -> None:
    """Copy ``tensors`` (adapter keys or parameter names) into ``model``, checking shapes."""
    params = model_tensor_map(model, tensors.keys(), adapter_name)
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"'{key}' has shape {tuple(value.shape)}, the model expects {tuple(params[key].shape)}")
        params[key].copy_(value.to(params[key].dtype))
