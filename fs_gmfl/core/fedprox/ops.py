"""FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def proximal_term(weights: Mapping[str, Tensor], anchor: Mapping[str, Tensor], *, mu: float) -> Tensor:
    """``mu/2 * sum_k ||w_k - w_global_k||^2`` (eq. 2 of Li et al.), summed in float32.

    Its gradient with respect to ``w_k`` is ``mu * (w_k - w_global_k)``, which
    pulls the local weights towards the global ones the round started from.

    Args:
        weights: the tensors being trained, by key.
        anchor: the global values of the same keys (constants).
        mu: the proximal weight.
    """
    total = torch.zeros((), device=next(iter(weights.values())).device)
    for key, w in weights.items():
        total = total + (w.float() - anchor[key].float()).pow(2).sum()
    return 0.5 * mu * total
