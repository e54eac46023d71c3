"""Tensors as (dtype name, shape, raw bytes): the exact, pickle-free form every host's transport uses.

The FederatedScope host carries the three fields in one string
(:mod:`fs_gmfl.hosts.fs.wire`), the Flower host in a Flower ``Array``
(:mod:`fs_gmfl.hosts.flower.records`). Both validate a received tensor the
same way, header first: a known dtype, at most :data:`MAX_DIMS` dimensions
of at most :data:`MAX_DIM_SIZE` each, the dtype and shape a control entry
must have (:data:`CONTROL_SPECS`), then the byte count, and only 0/1 bytes
in a bool tensor; nothing is allocated for a payload that fails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fs_gmfl.core.message import NUM_SAMPLES
from fs_gmfl.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
#: largest number of dimensions accepted for one tensor.
MAX_DIMS = 8
#: largest size of one dimension.
MAX_DIM_SIZE = 2**31 - 1
#: control entries whose dtype and shape are fixed, checked from the header before decoding (name -> dtype, shape).
CONTROL_SPECS: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {NUM_SAMPLES: (torch.int64, ())}


class WireError(InputError):
    """A payload is not a well-formed fs_gmfl wire message."""


def dtype_name(t: Tensor) -> str:
    """The wire name of ``t``'s dtype (:class:`WireError` if it cannot be sent)."""
    if t.dtype not in DTYPE_NAMES:
        raise WireError(f"dtype {t.dtype} cannot be sent; supported: {', '.join(DTYPES)}")
    return DTYPE_NAMES[t.dtype]


def raw_bytes(t: Tensor) -> bytes:
    """The tensor's elements as raw bytes in C order (CPU, contiguous)."""
    dtype_name(t)
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def check_header(name: str, kind_name: str, dims: Sequence[int], *, dtype: torch.dtype | None = None,
                 shape: tuple[int, ...] | None = None) -> tuple[torch.dtype, int]:
    """The dtype and the byte count a tensor of this header has, after checking it.

    Raises:
        WireError: unknown dtype, invalid shape, or not the ``dtype``/``shape`` expected.
    """
    if not isinstance(kind_name, str) or kind_name not in DTYPES:
        raise WireError(f"'{name}' has unsupported dtype {str(kind_name)[:20]!r}")
    dims = list(dims)
    if len(dims) > MAX_DIMS or any(type(d) is not int or d < 0 or d > MAX_DIM_SIZE for d in dims):
        raise WireError(f"'{name}' has an invalid shape {dims[:MAX_DIMS + 1]}")
    kind = DTYPES[kind_name]
    if dtype is not None and kind != dtype:
        raise WireError(f"'{name}' has dtype {kind_name}, expected {DTYPE_NAMES.get(dtype, dtype)}")
    if shape is not None and tuple(dims) != tuple(shape):
        raise WireError(f"'{name}' has shape {dims}, expected {list(shape)}")
    return kind, math.prod(dims) * torch.empty((), dtype=kind).element_size()


def tensor_from_raw(raw: bytes, kind: torch.dtype, dims: Sequence[int], expected: int, *, name: str) -> Tensor:
    """A tensor owning a private copy of ``raw`` (checked: ``expected`` bytes; bool bytes 0 or 1)."""
    if len(raw) != expected:
        raise WireError(f"'{name}' carries {len(raw)} bytes, shape {list(dims)} of {DTYPE_NAMES[kind]} needs "
                        f"{expected}")
    if kind == torch.bool and raw.translate(None, b"\x00\x01"):
        raise WireError(f"'{name}' is a bool tensor with bytes other than 0 and 1")
    if not raw:
        return torch.empty(list(dims), dtype=kind)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(kind).reshape(list(dims))
