"""The transport protocol's unit: a message of tensors, counted exactly.

Everything a server sends to a client (downlink) or a client to the server
(uplink) is a :class:`Message`. Model tensors go in ``tensors``; everything
else that travels (masks, indices, seeds, sample counts) goes in ``control``,
also as tensors, so that the byte count of a message is always
``sum(numel * element_size)`` over what is actually in it. Masks are sent
bit-packed (:func:`pack_bits`), so a mask over ``n`` tensors costs
``ceil(n / 8)`` bytes.

Both hosts (the embedded simulator and FederatedScope) move these messages;
strategies and client algorithms only ever see :class:`Message` objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

NUM_SAMPLES = "num_samples"


def tensor_bytes(t: Tensor) -> int:
    """Bytes of one tensor on the wire: ``numel * element_size``."""
    return t.numel() * t.element_size()


def total_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Sum of :func:`tensor_bytes` over a mapping of tensors."""
    return sum(tensor_bytes(t) for t in tensors.values())


def pack_bits(flags: Sequence[bool] | Tensor) -> Tensor:
    """Pack booleans into a ``uint8`` tensor, 8 flags a byte, first flag in bit 0."""
    bits = torch.as_tensor(flags, dtype=torch.bool).flatten()
    n = bits.numel()
    padded = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8)
    padded[:n] = bits.to(torch.uint8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` flags as a bool tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() * 8 < n:
        raise ValueError(f"cannot unpack {n} flags from a {packed.dtype} tensor of shape {tuple(packed.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.flatten()[:n].to(torch.bool)


@dataclass
class Message:
    """A payload between server and client.

    Attributes:
        tensors: model tensors keyed by adapter key (LoRA factors, head, ...).
        control: protocol tensors (bit-packed masks, index lists, seeds, the
            sample count), keyed by name.
    """

    tensors: dict[str, Tensor] = field(default_factory=dict)
    control: dict[str, Tensor] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        """Bytes of the model tensors."""
        return total_bytes(self.tensors)

    @property
    def control_bytes(self) -> int:
        """Bytes of the protocol tensors."""
        return total_bytes(self.control)

    @property
    def nbytes(self) -> int:
        """All bytes of the message."""
        return self.payload_bytes + self.control_bytes

    @property
    def num_samples(self) -> int:
        """The sample count an uplink carries (0 if absent or not one integer, which every server rejects)."""
        t = self.control.get(NUM_SAMPLES)
        if not isinstance(t, Tensor) or t.numel() != 1 or t.is_floating_point() or t.is_complex() \
                or t.dtype == torch.bool:
            return 0
        return int(t.item())

    def detached_copy(self) -> Message:
        """A deep copy whose tensors share no storage with this message."""
        return Message({k: v.detach().clone() for k, v in self.tensors.items()},
                       {k: v.detach().clone() for k, v in self.control.items()})


def samples_tensor(n: int) -> Tensor:
    """The 8-byte sample-count tensor carried by every uplink."""
    return torch.tensor(int(n), dtype=torch.int64)


@dataclass
class Reply:
    """An uplink together with the id of the client that sent it."""

    client_id: int
    message: Message
