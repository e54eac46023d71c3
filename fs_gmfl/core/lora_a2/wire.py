"""LoRA-A2's wire format: FedIT's (:mod:`fs_gmfl.core.fedavg.wire`) plus the round's parity.

* downlink: the whole global adapter and ``control["lora_a2.parity"]``, the
  round number modulo 2 (one uint8 byte, counted), which tells the client
  which factor to train (:func:`~fs_gmfl.core.lora_a2.ops.trained_factor`);
* uplink: the tensors trained that round only (one LoRA factor and the
  head) and ``num_samples``, roughly half of FedIT's uplink.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fs_gmfl.core.message import Message
from fs_gmfl.errors import InputError

PARITY = "lora_a2.parity"


def parity_tensor(rnd: int) -> Tensor:
    """The downlink's parity entry for round ``rnd``: ``rnd % 2`` as one uint8."""
    return torch.tensor(rnd % 2, dtype=torch.uint8)


def round_of_parity(message: Message) -> int:
    """A round with the downlink's parity (1: odd, 2: even), for :func:`~fs_gmfl.core.lora_a2.ops.trained_factor`.

    Raises:
        InputError: the parity entry is missing or is not one integer 0 or 1.
    """
    t = message.control.get(PARITY)
    if not isinstance(t, Tensor) or t.numel() != 1 or t.is_floating_point() or t.is_complex() \
            or int(t.item()) not in (0, 1):
        raise InputError(f"LoRA-A2 downlink lacks a valid '{PARITY}' entry (one integer, 0 or 1)")
    return 2 - int(t.item())
