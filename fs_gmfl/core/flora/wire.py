"""FLoRA's wire format.

* downlink: ``flora.delta/<weight name>``, the accumulated merged update
  ``D = sum over rounds of B_stack A_stack`` of every adapted module, dense
  (``d_out x d_in`` in the stored weight's layout, float32), once a round
  has been merged (absent before: ``D = 0``); the head; ``flora.seed``
  (int64, 8 bytes), the seed the client re-initialises its LoRA factors
  from; ``flora.rank`` (int16, 2 bytes), the client's rank r_k;
* uplink: every module's trained ``A_k`` (``r_k x d_in``) and ``B_k``
  (``d_out x r_k``) under the adapter keys, the head, ``num_samples``.

A client rebuilds the server's merged weight ``W0 + D`` from ``D`` alone,
whatever rounds it missed (nothing is cached between rounds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fs_gmfl.core.flora.ops import MergedModule
from fs_gmfl.core.message import Message
from fs_gmfl.errors import InputError

DELTA_PREFIX = "flora.delta/"
SEED = "flora.seed"
RANK = "flora.rank"
#: the rank's wire dtype (ranks up to 32767).
RANK_DTYPE = torch.int16


def delta_key(module: MergedModule) -> str:
    """The downlink key of a module's accumulated merged update."""
    return DELTA_PREFIX + module.weight_name


def downlink_message(delta: Mapping[str, Tensor] | None, head: Mapping[str, Tensor], modules: Sequence[MergedModule],
                     *, seed: int, rank: int) -> Message:
    """One client's downlink: the merged updates (``None``: nothing merged yet), the head, the seed and its rank."""
    tensors = {delta_key(m): delta[m.weight_name] for m in modules} if delta is not None else {}
    tensors.update(head)
    return Message(tensors, {SEED: torch.tensor(int(seed), dtype=torch.int64),
                             RANK: torch.tensor(int(rank), dtype=RANK_DTYPE)})


@dataclass
class Downlink:
    """A parsed downlink."""

    delta: dict[str, Tensor] | None
    head: dict[str, Tensor]
    seed: int
    rank: int


def _integer(message: Message, name: str, dtype: torch.dtype) -> int:
    t = message.control.get(name)
    if not isinstance(t, Tensor) or t.dtype != dtype or t.numel() != 1:
        raise InputError(f"FLoRA downlink lacks a valid '{name}' entry (one {dtype} value)")
    return int(t.item())


def parse_downlink(message: Message, modules: Sequence[MergedModule], head_keys: Sequence[str],
                   *, max_rank: int) -> Downlink:
    """The merged updates (all or none), the head, the seed and the rank of a downlink.

    Raises:
        InputError: a control entry is missing or malformed, the rank is outside ``[1, max_rank]``, some but not
            all merged updates are present, one has the wrong shape, or a head tensor is missing.
    """
    seed, rank = _integer(message, SEED, torch.int64), _integer(message, RANK, RANK_DTYPE)
    if not 1 <= rank <= max_rank:
        raise InputError(f"FLoRA downlink rank {rank} is outside [1, {max_rank}]")
    present = [m for m in modules if delta_key(m) in message.tensors]
    if present and len(present) != len(modules):
        raise InputError(f"FLoRA downlink carries {len(present)} of {len(modules)} merged updates (all or none)")
    for m in present:
        if tuple(message.tensors[delta_key(m)].shape) != m.weight_shape:
            raise InputError(f"merged update '{delta_key(m)}' has shape {tuple(message.tensors[delta_key(m)].shape)}, "
                             f"expected {m.weight_shape}")
    missing = [k for k in head_keys if k not in message.tensors]
    if missing:
        raise InputError(f"FLoRA downlink lacks the head tensor '{missing[0]}'")
    delta = {m.weight_name: message.tensors[delta_key(m)] for m in present} if present else None
    return Downlink(delta, {k: message.tensors[k] for k in head_keys}, seed, rank)
