"""FedEx-LoRA's wire format: FedIT's (:mod:`fs_gmfl.core.fedavg.wire`) plus the base weights of the adapted modules.

* downlink: the whole global adapter (LoRA factors and head) and, for every
  adapted module, its base weight with every residual so far folded in
  (``W0 + sum of residuals``, ``d_out x d_in`` entries), under the weight's
  ``named_parameters`` name (``<module>.base_layer.weight``). This is
  FedEx-LoRA's own downlink cost (spec GMFL.md section 7.2: "the base-weight
  residual must also be broadcast"); it is sent as the folded weight rather
  than as the residual alone (the same bytes) so that a client sets its base
  weight to an absolute value: hosts that load the global model into a model
  shared with the clients (FederatedScope's server after aggregation, its
  evaluation broadcast) cannot make a residual count twice;
* uplink: FedIT's, the trained LoRA factors and head and ``num_samples``
  (the residual is computed on the server).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from fs_gmfl.core.adapter import lora_pairs, model_tensor_map
from fs_gmfl.core.fedex_lora.ops import ResidualTarget
from fs_gmfl.errors import InputError

#: the name of an adapted module's base weight under peft (``<module>.base_layer.weight``).
BASE_WEIGHT = "{module}.base_layer.weight"


def residual_targets(model: nn.Module, adapter_keys: Iterable[str],
                     adapter_name: str = "default") -> list[ResidualTarget]:
    """Every adapted module of ``model`` (a peft model, possibly on the meta device) with its base weight.

    The scaling is the module's own (peft's ``scaling[adapter]``, ``alpha / r``)
    and the layout peft's ``fan_in_fan_out`` (a weight stored ``d_in x d_out``).

    Raises:
        InputError: an adapted module has no ``base_layer.weight`` (not a peft LoRA layer).
    """
    modules = dict(model.named_modules())
    targets = []
    for pair in lora_pairs(adapter_keys):
        layer = modules.get(pair.module)
        base = getattr(layer, "base_layer", None)
        if layer is None or not isinstance(getattr(base, "weight", None), Tensor):
            raise InputError(f"FedEx-LoRA: '{pair.module}' is not a peft LoRA layer with a base weight")
        scaling = float(layer.scaling[adapter_name])
        targets.append(ResidualTarget(pair.module, pair.a_key, pair.b_key, BASE_WEIGHT.format(module=pair.module),
                                      bool(getattr(layer, "fan_in_fan_out", False)), scaling))
    return targets


def base_weights(model: nn.Module, targets: Iterable[ResidualTarget]) -> dict[str, Tensor]:
    """The current base weights of ``targets`` in ``model`` (detached copies), by name."""
    params = model_tensor_map(model, [t.weight for t in targets])
    return {name: p.detach().clone() for name, p in params.items()}


def split_downlink(tensors: Mapping[str, Tensor], targets: Iterable[ResidualTarget]) -> tuple[dict[str, Tensor],
                                                                                               dict[str, Tensor]]:
    """A downlink's tensors as ``(adapter tensors, base weights)``.

    Raises:
        InputError: the base weight of a target is missing.
    """
    names = [t.weight for t in targets]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise InputError(f"FedEx-LoRA downlink lacks {len(missing)} base weights, e.g. '{missing[0]}'")
    weights = {n: tensors[n] for n in names}
    return {k: v for k, v in tensors.items() if k not in weights}, weights
