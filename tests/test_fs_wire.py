"""Wire form of fs_gmfl messages inside FederatedScope content (no FederatedScope needed)."""

from __future__ import annotations

import base64

import pytest
import torch

from fs_gmfl.core.message import Message, pack_bits, samples_tensor
from fs_gmfl.hosts.fs import wire


def sample_message() -> Message:
    g = torch.Generator().manual_seed(0)
    return Message(
        {"m.lora_A.weight": torch.randn(4, 16, generator=g), "m.lora_B.weight": torch.randn(16, 4, generator=g),
         "head.weight": torch.randn(3, dtype=torch.bfloat16, generator=g), "empty": torch.zeros(0, 5)},
        {"mask": pack_bits([1, 0, 1, 1, 0, 0, 0, 0, 1]), "seed": torch.tensor(2**62 + 7, dtype=torch.int64),
         "flags": torch.tensor([True, False, True]), "num_samples": samples_tensor(40)})


def test_roundtrip_is_exact_for_every_dtype_and_shape():
    """fp32, bf16, empty, packed uint8 masks, a 63-bit int64 seed and bools come back bit-identical."""
    # Prepare
    msg = sample_message()
    # Execute
    back = wire.decode(wire.encode(msg, wire.UPLINK), expect=wire.UPLINK)
    # Assert
    for part in ("tensors", "control"):
        sent, got = getattr(msg, part), getattr(back, part)
        assert list(sent) == list(got)
        for key in sent:
            assert got[key].dtype == sent[key].dtype and got[key].shape == sent[key].shape
            assert torch.equal(got[key].view(-1).view(torch.uint8) if got[key].numel() else got[key],
                               sent[key].view(-1).view(torch.uint8) if sent[key].numel() else sent[key])
    assert int(back.control["seed"]) == 2**62 + 7 and back.num_samples == 40
    assert back.nbytes == msg.nbytes


def test_wire_dict_is_flat_non_empty_and_string_only():
    """gRPC limits: no bool, no empty dict, only str values; an empty message still has its marker."""
    for msg in (sample_message(), Message()):
        content = wire.encode(msg, wire.DOWNLINK)
        assert content and all(isinstance(k, str) and isinstance(v, str) for k, v in content.items())
    assert wire.encode(Message(), wire.DOWNLINK) == {"fs_gmfl": "downlink/1"}


def test_decoded_tensors_are_independent_of_the_payload():
    """Decoding copies: changing a decoded tensor cannot alias another decode of the same content."""
    content = wire.encode(sample_message(), wire.ADAPTER)
    first, second = (wire.decode(content, expect=wire.ADAPTER) for _ in range(2))
    first.tensors["m.lora_A.weight"].add_(1.0)
    assert not torch.equal(first.tensors["m.lora_A.weight"], second.tensors["m.lora_A.weight"])


def test_payload_bytes_from_headers_equals_message_bytes():
    """Byte count read from the wire headers alone = Message.nbytes (64*4 + 64*4 + 3*2 + 0 + 2 + 8 + 3 + 8)."""
    msg = sample_message()
    assert wire.payload_bytes(wire.encode(msg, wire.UPLINK)) == msg.nbytes == 539


def test_kind_of_recognises_only_fs_gmfl_payloads():
    """A FederatedScope state dict, a wrong version or a non-mapping is not a wire payload."""
    assert wire.kind_of(wire.encode(Message(), wire.UPLINK)) == wire.UPLINK
    assert wire.kind_of({"base_model.model.x.lora_A.default.weight": torch.zeros(1)}) is None
    assert wire.kind_of({"fs_gmfl": "uplink/2"}) is None
    assert wire.kind_of([1, 2]) is None


def _good() -> dict[str, str]:
    return wire.encode(Message({"a": torch.ones(2, 2)}), wire.UPLINK)


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.update({"fs_gmfl": "downlink/1"}), "expected a uplink message, got a downlink"),
    (lambda c: c.update({"x/evil": "float32||"}), "unknown entry"),
    (lambda c: c.update({"t/a": "complex64|2|AAAA"}), "unsupported dtype"),
    (lambda c: c.update({"t/a": "float32|2,2|" + base64.b64encode(b"\0" * 12).decode()}), "carries 12 bytes"),
    (lambda c: c.update({"t/a": "float32|2,2|not base64!"}), "invalid base64"),
    (lambda c: c.update({"t/a": "float32|-1|"}), "invalid shape"),
    (lambda c: c.update({"t/a": "float32|a,b|"}), "malformed shape"),
    (lambda c: c.update({"t/a": 3.5}), "not an encoded tensor"),
    (lambda c: c.pop("fs_gmfl"), "not an fs_gmfl message"),
])
def test_malformed_payloads_are_rejected_with_a_reason(mutate, match):
    """Every malformed field raises WireError naming what is wrong; nothing is unpickled."""
    content = _good()
    mutate(content)
    with pytest.raises(wire.WireError, match=match):
        wire.decode(content, expect=wire.UPLINK)
