"""Messages: bit packing and exact byte counts."""

from __future__ import annotations

import pytest
import torch

from fs_gmfl.core.message import Message, pack_bits, samples_tensor, tensor_bytes, unpack_bits


@pytest.mark.parametrize("n", [1, 7, 8, 9, 48, 449])
def test_pack_unpack_roundtrip(n):
    """pack_bits -> unpack_bits is the identity and costs ceil(n/8) bytes."""
    flags = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = pack_bits(flags)
    assert packed.dtype == torch.uint8 and tensor_bytes(packed) == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), flags)


def test_pack_bits_layout_first_flag_in_bit_zero():
    """[1,0,1,1,0,0,0,0, 1] -> bytes [0b1101, 1]."""
    assert pack_bits([1, 0, 1, 1, 0, 0, 0, 0, 1]).tolist() == [13, 1]


def test_message_bytes_are_numel_times_element_size():
    """fp32 (3x4) + bf16 (5) + int64 scalar = 48 + 10 + 8 bytes."""
    msg = Message({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)}, {"num_samples": samples_tensor(7)})
    assert (msg.payload_bytes, msg.control_bytes, msg.nbytes) == (58, 8, 66)
    assert msg.num_samples == 7


def test_detached_copy_shares_no_storage():
    """A copied message can be modified without touching the original."""
    msg = Message({"a": torch.ones(2)})
    copy = msg.detached_copy()
    copy.tensors["a"].add_(1)
    assert torch.equal(msg.tensors["a"], torch.ones(2))


def test_unpack_rejects_wrong_input():
    """Too few bytes or a wrong dtype is refused."""
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(2, dtype=torch.int32), 9)
