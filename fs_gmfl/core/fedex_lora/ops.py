"""FedEx-LoRA's exact aggregation (spec GMFL.md section 7.2; the authors' ``fed/FedExLora.py``, ``--ex_style``).

Averaging the LoRA factors separately is inexact: ``mean_k(B_k A_k) != B̄ Ā``.
FedEx-LoRA keeps ``Ā`` and ``B̄`` as the new global factors and folds the
difference into the frozen base weight of every adapted module::

    W0 <- W0 + (alpha / r) * (mean_k (B_k A_k) - B̄ Ā)

so that the merged global model ``W0 + (alpha/r) B̄ Ā`` equals the mean of the
clients' merged models ``W0 + (alpha/r) B_k A_k``. The means are uniform over
the round's participants (not sample-weighted).

:class:`ProductSums` is the running ``sum_k B_k A_k`` of a streaming fold; the
list-form reference lives in ``tests/reference_aggregation.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fs_gmfl.errors import AggregationError

F64 = torch.float64


@dataclass(frozen=True)
class ResidualTarget:
    """One adapted module whose frozen base weight receives FedEx-LoRA's residual.

    Attributes:
        module: the adapted module's path (``...attention.self.query``).
        a_key, b_key: adapter keys of its ``lora_A`` (``r x d_in``) and ``lora_B`` (``d_out x r``).
        weight: ``named_parameters`` name of its base weight (``<module>.base_layer.weight``).
        transposed: the base weight is stored ``d_in x d_out`` (peft ``fan_in_fan_out``, GPT-2's ``Conv1D``).
        scaling: the module's LoRA scaling ``alpha / r``.
    """

    module: str
    a_key: str
    b_key: str
    weight: str
    transposed: bool
    scaling: float


class ProductSums:
    """Running ``sum_k B_k A_k`` (float64, ``d_out x d_in``) per target: the product half of FedEx-LoRA's fold.

    Each :meth:`add` folds one client's factors and keeps no reference to
    them; memory is one float64 ``d_out x d_in`` matrix per target, whatever
    the number of clients.

    Args:
        targets: the modules whose products are summed (both factors uploaded).
    """

    def __init__(self, targets: Sequence[ResidualTarget]) -> None:
        self.targets = list(targets)
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, tensors: Mapping[str, Tensor]) -> None:
        """Fold ``B_k A_k`` of one client (``tensors`` is neither mutated nor kept).

        Raises:
            AggregationError: a factor of a target is missing.
        """
        for t in self.targets:
            if t.a_key not in tensors or t.b_key not in tensors:
                raise AggregationError(f"FedEx-LoRA: the factors of '{t.module}' are missing from state {self.count}")
            product = tensors[t.b_key].to(F64) @ tensors[t.a_key].to(F64)
            if t.module in self.sums:
                self.sums[t.module].add_(product)
            else:
                self.sums[t.module] = product
        self.count += 1

    def mean(self, target: ResidualTarget) -> Tensor:
        """``mean_k B_k A_k`` of ``target`` (float64).

        Raises:
            AggregationError: nothing was added.
        """
        if not self.count:
            raise AggregationError("no states to average")
        return self.sums[target.module] / self.count


def residual(mean_product: Tensor, mean_b: Tensor, mean_a: Tensor, *, scaling: float) -> Tensor:
    """FedEx-LoRA's residual ``(alpha/r) (mean_k B_k A_k - B̄ Ā)`` in float64, ``d_out x d_in`` (spec 7.2).

    Args:
        mean_product: ``mean_k B_k A_k``.
        mean_b, mean_a: the new global factors ``B̄`` and ``Ā`` (as stored, so that the merged model
            ``W0' + (alpha/r) B̄ Ā`` equals the clients' mean merged model).
        scaling: ``alpha / r``.
    """
    return scaling * (mean_product.to(F64) - mean_b.to(F64) @ mean_a.to(F64))


def fold_residual(weight: Tensor, delta: Tensor, *, transposed: bool) -> Tensor:
    """``weight + delta`` in ``weight``'s dtype (a new tensor), ``delta`` (``d_out x d_in``) transposed for a
    weight stored ``d_in x d_out``."""
    delta = delta.T if transposed else delta
    if tuple(delta.shape) != tuple(weight.shape):
        raise AggregationError(f"residual of shape {tuple(delta.shape)} does not fit a base weight of shape "
                               f"{tuple(weight.shape)}")
    return (weight.to(F64) + delta).to(weight.dtype)
