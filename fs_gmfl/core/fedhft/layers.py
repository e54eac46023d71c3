"""A row-subset ``lora_B`` for FedHFT's ``premask`` variant.

With ``premask`` a client trains only the ``k`` rows of ``lora_B`` it will
upload. Masking the gradient of a full ``d_out × r`` parameter would still
allocate a full gradient and full AdamW moments; :class:`RowSubsetLinear`
instead holds a ``k × r`` parameter and scatters its output into the ``k``
kept output features, so the gradient, the optimizer state and the ``B``
matmul all scale with the keep ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RowSubsetLinear(nn.Module):
    """A bias-free linear map ``R^r -> R^d_out`` whose rows outside ``rows`` are fixed at zero.

    Args:
        rows: the trainable output rows (ascending ``int64``).
        out_features: ``d_out``.
        in_features: ``r``.
        dtype, device: of the ``k × r`` weight (initialised to zero, as LoRA's ``B``).
    """

    def __init__(self, rows: Tensor, out_features: int, in_features: int, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.register_buffer("rows", rows.to(torch.long).clone().to(device), persistent=False)
        self.weight = nn.Parameter(torch.zeros(rows.numel(), in_features, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        """``y[..., rows] = x W_subᵀ``, zero elsewhere."""
        sub = F.linear(x, self.weight)
        return sub.new_zeros(*sub.shape[:-1], self.out_features).index_copy(-1, self.rows, sub)

    def dense_weight(self) -> Tensor:
        """The equivalent ``d_out × r`` weight (a detached copy)."""
        w = self.weight.detach()
        return w.new_zeros(self.out_features, self.in_features).index_copy(0, self.rows, w)
