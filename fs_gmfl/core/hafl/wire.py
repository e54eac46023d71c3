"""HAFL's wire format: message keys, the index dtype and the uplink encoder.

Wire format (all tensors, counted exactly):

* downlink, truncation: rows ``S_k`` of every ``A`` and columns ``S_k`` of
  every ``B`` in score order, plus ``scores`` (``modules x r_max`` float32);
* downlink, freezing: the full ``A`` and ``B``, ``scores`` and ``n_train``
  (the client's number of trained components, int16);
* uplink: the trained rows of ``A`` / columns of ``B`` (``n_k`` per module),
  ``indices`` (``modules x n_k`` int16: the global index of each uploaded
  component) and ``num_samples``;
* the head travels both ways only with ``hafl.train_head``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fs_gmfl.core.adapter import HEAD, LoraPair, kind_of
from fs_gmfl.core.hafl import ops
from fs_gmfl.core.message import NUM_SAMPLES, Message, samples_tensor

SCORES = "scores"
N_TRAIN = "n_train"
INDICES = "indices"
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def index_dtype(rank: int) -> torch.dtype:
    """The smallest integer dtype of the wire index lists for ``rank`` components."""
    return torch.int16 if rank <= torch.iinfo(torch.int16).max else torch.int32


def build_uplink(tensors: Mapping[str, Tensor], pairs: Sequence[LoraPair], selected: Tensor, *, rank: int,
                 num_samples: int, truncated: bool) -> Message:
    """The uplink: components ``selected`` of every module (rows of A, columns of B), heads, indices, sample count.

    Args:
        tensors: the client's factors by key (rank-n_k ones already in
            ``selected`` order when ``truncated``, else rank r_max) and any head.
        pairs: the adapted modules, in the order of the rows of ``selected``.
        selected: ``modules x n_k`` global component indices.
        rank: r_max (sets the index dtype).
    """
    out: dict[str, Tensor] = {}
    if selected.shape[1]:
        for pair, chosen in zip(pairs, selected):
            a, b = tensors[pair.a_key], tensors[pair.b_key]
            if not truncated:
                a, b = ops.take_components(a, b, chosen)
            out[pair.a_key], out[pair.b_key] = a.clone(), b.clone()
    out.update({k: t.clone() for k, t in tensors.items() if kind_of(k) == HEAD})
    return Message(out, {INDICES: selected.to(index_dtype(rank)), NUM_SAMPLES: samples_tensor(num_samples)})
