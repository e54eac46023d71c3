"""Wire form of a :class:`~fs_gmfl.core.message.Message` inside FederatedScope message content.

FederatedScope's gRPC transport carries only nested lists, string-keyed dicts,
int32, float32 and strings; it rejects Python ``bool`` and empty dicts, and it
unpickles ``model_para`` tensors. fs_gmfl therefore sends its payloads as one
flat, never-empty ``dict[str, str]``::

    {"fs_gmfl": "<kind>/1",            # marker, version and purpose
     "t/<adapter key>": "<tensor>",    # Message.tensors
     "c/<control name>": "<tensor>"}   # Message.control

Each ``<tensor>`` is ``"<dtype>|<d0,d1,...>|<base64 of the raw bytes>"``: exact
for every dtype (bf16, int64 seeds and packed bit masks included), identical in
standalone and distributed mode, and decoded without ``pickle``, so a peer cannot
run code on the receiver. :func:`decode` checks dtype, shape (and the fixed form of
the sample count) and length before building anything and raises
:class:`WireError` on a malformed payload.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fs_gmfl.core.message import Message
from fs_gmfl.hosts.common.tensor_wire import (CONTROL_SPECS, DTYPES, WireError, check_header, dtype_name,
                                              raw_bytes, tensor_from_raw)

MARKER = "fs_gmfl"
VERSION = 1
DOWNLINK = "downlink"
UPLINK = "uplink"
ADAPTER = "adapter"
KINDS = (DOWNLINK, UPLINK, ADAPTER)
TENSOR_PREFIX = "t/"
CONTROL_PREFIX = "c/"


def encode_tensor(t: Tensor) -> str:
    """``"<dtype>|<shape>|<base64 raw bytes>"`` of one tensor (exact, any supported dtype)."""
    shape = ",".join(str(d) for d in t.shape)
    return f"{dtype_name(t)}|{shape}|{base64.b64encode(raw_bytes(t)).decode('ascii')}"


def decode_tensor(text: Any, *, name: str = "tensor", dtype: torch.dtype | None = None,
                  shape: tuple[int, ...] | None = None) -> Tensor:
    """Inverse of :func:`encode_tensor`, validating every field before any tensor is built.

    The header (dtype, shape) is checked first, against ``dtype`` and
    ``shape`` when given, then the length of the base64 text, then the
    decoded byte count; bool payloads must hold only 0 and 1 bytes.

    Raises:
        WireError: not a string of three fields, an unknown or unexpected
            dtype, a bad or unexpected shape, invalid base64 or a byte length
            that does not match.
    """
    if not isinstance(text, str) or text.count("|") != 2:
        raise WireError(f"'{name}' is not an encoded tensor")
    kind_name, shape_text, data = text.split("|")
    try:
        dims = [int(d) for d in shape_text.split(",")] if shape_text else []
    except ValueError:
        raise WireError(f"'{name}' has a malformed shape {shape_text[:40]!r}") from None
    kind, expected = check_header(name, kind_name, dims, dtype=dtype, shape=shape)
    if len(data) > 4 * math.ceil(expected / 3):  # refused before decoding: an oversized payload allocates nothing
        raise WireError(f"'{name}' carries {len(data)} base64 characters, more than shape {dims} of {kind_name} "
                        f"({expected} bytes) needs")
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise WireError(f"'{name}' carries invalid base64") from None
    return tensor_from_raw(raw, kind, dims, expected, name=name)


def encode(message: Message, kind: str) -> dict[str, str]:
    """The wire dict of ``message`` (never empty: the marker is always present)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = {MARKER: f"{kind}/{VERSION}"}
    out.update({TENSOR_PREFIX + k: encode_tensor(v) for k, v in message.tensors.items()})
    out.update({CONTROL_PREFIX + k: encode_tensor(v) for k, v in message.control.items()})
    return out


def encode_tensors(tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """Wire dict of a plain tensor set (kind ``adapter``: e.g. the global adapter for evaluation)."""
    return encode(Message(dict(tensors)), ADAPTER)


def payload_bytes(content: Mapping[str, str]) -> int:
    """Bytes of the tensors in a wire dict, read from the headers alone (``numel * element_size``)."""
    total = 0
    for key, value in content.items():
        if key == MARKER or not isinstance(value, str) or value.count("|") != 2:
            continue
        dtype_name, shape_text, _ = value.split("|")
        if dtype_name in DTYPES:
            numel = math.prod(int(d) for d in shape_text.split(",")) if shape_text else 1
            total += numel * torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    return total


def kind_of(content: Any) -> str | None:
    """The kind of a wire dict, or ``None`` if ``content`` is not one (e.g. a FederatedScope state dict)."""
    if not isinstance(content, Mapping):
        return None
    marker = content.get(MARKER)
    if not isinstance(marker, str) or "/" not in marker:
        return None
    kind, _, version = marker.partition("/")
    return kind if kind in KINDS and version == str(VERSION) else None


def decode(content: Any, *, expect: str) -> Message:
    """Decode a wire dict of kind ``expect`` into a :class:`Message`.

    Control entries with a fixed form (:data:`CONTROL_SPECS`: the sample
    count is one int64 scalar) are checked against it from the header.

    Raises:
        WireError: not a wire dict, the wrong kind, an unknown entry or a
            malformed tensor.
    """
    kind = kind_of(content)
    if kind is None:
        raise WireError(f"payload is not an fs_gmfl message (got {type(content).__name__})")
    if kind != expect:
        raise WireError(f"expected a {expect} message, got a {kind} message")
    message = Message()
    for key, value in content.items():
        if key == MARKER:
            continue
        if not isinstance(key, str):
            raise WireError(f"entry name {key!r} is not a string")
        if key.startswith(TENSOR_PREFIX):
            message.tensors[key[len(TENSOR_PREFIX):]] = decode_tensor(value, name=key)
        elif key.startswith(CONTROL_PREFIX):
            name = key[len(CONTROL_PREFIX):]
            dtype, shape = CONTROL_SPECS.get(name, (None, None))
            message.control[name] = decode_tensor(value, name=key, dtype=dtype, shape=shape)
        else:
            raise WireError(f"unknown entry {key[:60]!r}")
    return message
