"""FedHFT's wire format: what the downlink and the uplink hold, and their validation.

Downlink to client i (spec §6): the rank-r factors ``(B̃_i, Ã_i)`` of its
personalised mixture under the ``lora_B`` / ``lora_A`` keys of every adapted
module (absent before the first aggregation: the start is then ``W0``), its
head ``Σ_j π_ij C_j`` under the head keys, and two control tensors: the
client's resource level (``uint8``) and the seed of its fresh LoRA
initialisation (``int64``).

Uplink: ``A_i`` in full, only the kept rows of ``B_i`` (``k × r`` under the
``lora_B`` key), the head, the sample count and, per module with
``k < d_out``, the kept rows: a bitmap (``ceil(d_out / 8)`` bytes, via
:func:`~fs_gmfl.core.message.pack_bits`) or, when smaller (``s < 1/16``),
the sorted indices as ``int16`` (``int32`` if ``d_out > 32768``; signed types
because every host's wire format carries them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fs_gmfl.core.adapter import HEAD, LORA_A, LORA_B, LoraPair, kind_of, lora_pairs
from fs_gmfl.core.message import NUM_SAMPLES, Message, pack_bits, samples_tensor, unpack_bits
from fs_gmfl.core.validation import DEFAULT_MAX_ABS, check_sample_count, check_tensor

LEVEL = "level"
SEED = "seed"
ROW_BITS = "rows_bits:"
ROW_INDEX = "rows_idx:"


@dataclass(frozen=True)
class AdapterLayout:
    """Shapes of the adapter: LoRA pairs with ``(d_out, d_in, r)``, head keys, and reference tensors."""

    pairs: tuple[LoraPair, ...]
    shapes: dict[str, tuple[int, int, int]]
    head_keys: tuple[str, ...]
    reference: dict[str, Tensor]

    @classmethod
    def of(cls, adapter: Mapping[str, Tensor]) -> AdapterLayout:
        """Layout of an adapter state (LoRA factors and head) keyed by adapter key."""
        pairs = tuple(lora_pairs(adapter))
        if not pairs:
            raise ValueError("FedHFT needs at least one LoRA-adapted module")
        shapes = {p.module: (adapter[p.b_key].shape[0], adapter[p.a_key].shape[1], adapter[p.a_key].shape[0])
                  for p in pairs}
        heads = tuple(k for k in adapter if kind_of(k) == HEAD)
        others = [k for k in adapter if kind_of(k) not in (HEAD, LORA_A, LORA_B)]
        if others:
            raise ValueError(f"FedHFT cannot federate adapter tensors other than LoRA and head: {others[:3]}")
        return cls(pairs, shapes, heads, {k: v for k, v in adapter.items()})

    @property
    def rank(self) -> int:
        """The LoRA rank (the same for every module)."""
        return next(iter(self.shapes.values()))[2]


def row_index_dtype(d_out: int) -> torch.dtype:
    """2-byte ``int16`` row indices when they fit, else ``int32``."""
    return torch.int16 if d_out <= 2**15 else torch.int32


def encode_rows(module: str, rows: Tensor, d_out: int) -> dict[str, Tensor]:
    """Control entry for the kept ``rows`` (ascending) of one module: nothing if every row is kept."""
    k = rows.numel()
    if k == d_out:
        return {}
    dtype = row_index_dtype(d_out)
    index_bytes = k * torch.empty((), dtype=dtype).element_size()
    if index_bytes < (d_out + 7) // 8:
        return {ROW_INDEX + module: rows.to(torch.int64).to(dtype)}
    mask = torch.zeros(d_out, dtype=torch.bool)
    mask[rows.to(torch.long)] = True
    return {ROW_BITS + module: pack_bits(mask)}


def decode_rows(control: Mapping[str, Tensor], module: str, d_out: int, k: int) -> Tensor | str:
    """The kept rows of ``module`` (ascending ``int64``) or the reason they are malformed."""
    bits, index = control.get(ROW_BITS + module), control.get(ROW_INDEX + module)
    if k == d_out:
        if bits is not None or index is not None:
            return f"row mask of '{module}' sent although every row is kept"
        return torch.arange(d_out)
    if (bits is None) == (index is None):
        return f"'{module}' needs exactly one row encoding (bitmap or indices)"
    if bits is not None:
        return _decode_bitmap(bits, module, d_out, k)
    return _decode_indices(index, module, d_out, k)


def _decode_bitmap(bits: Tensor, module: str, d_out: int, k: int) -> Tensor | str:
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (d_out + 7) // 8:
        return f"row bitmap of '{module}' must be {(d_out + 7) // 8} uint8 bytes"
    flags = unpack_bits(bits, bits.numel() * 8)
    if bool(flags[d_out:].any()):
        return f"row bitmap of '{module}' sets padding bits"
    if int(flags.sum()) != k:
        return f"row bitmap of '{module}' keeps {int(flags.sum())} rows, expected {k}"
    return torch.nonzero(flags[:d_out]).flatten()


def _decode_indices(index: Tensor, module: str, d_out: int, k: int) -> Tensor | str:
    if index.dtype != row_index_dtype(d_out) or index.dim() != 1 or index.numel() != k:
        return f"row indices of '{module}' must be {k} {row_index_dtype(d_out)} values"
    rows = index.to(torch.int64)
    if k and (int(rows.max()) >= d_out or int(rows.min()) < 0 or not bool((rows[1:] > rows[:-1]).all())):
        return f"row indices of '{module}' must be strictly increasing and below {d_out}"
    return rows


def downlink_message(
    head: Mapping[str, Tensor], factors: Mapping[str, Tensor] | None, *, level: int, seed: int
) -> Message:
    """Personalised factors (if any), head, level and initialisation seed of one client."""
    tensors = {k: v.clone() for k, v in (factors or {}).items()}
    tensors.update({k: v.clone() for k, v in head.items()})
    control = {LEVEL: torch.tensor(level, dtype=torch.uint8), SEED: torch.tensor(seed, dtype=torch.int64)}
    return Message(tensors, control)


def uplink_message(
    layout: AdapterLayout,
    a: Mapping[str, Tensor],
    b_rows: Mapping[str, Tensor],
    rows: Mapping[str, Tensor],
    head: Mapping[str, Tensor],
    num_samples: int,
) -> Message:
    """The uplink: full ``A``, kept rows of ``B`` and their encoding, head, sample count."""
    tensors: dict[str, Tensor] = {}
    control: dict[str, Tensor] = {NUM_SAMPLES: samples_tensor(num_samples)}
    for pair in layout.pairs:
        tensors[pair.a_key] = a[pair.a_key]
        tensors[pair.b_key] = b_rows[pair.b_key]
        control.update(encode_rows(pair.module, rows[pair.module], layout.shapes[pair.module][0]))
    tensors.update(head)
    return Message(tensors, control)


@dataclass
class ParsedUplink:
    """A validated uplink: factors, kept rows per module, head and sample count."""

    a: dict[str, Tensor]
    b_rows: dict[str, Tensor]
    rows: dict[str, Tensor]
    head: dict[str, Tensor]
    num_samples: int


def parse_uplink(
    message: Message, layout: AdapterLayout, kept: Mapping[str, int], *, max_abs: float = DEFAULT_MAX_ABS,
    wire_dtype: torch.dtype | None = None,
) -> ParsedUplink | str:
    """Validate a whole uplink before any of it is used; the parsed upload or the reason to reject it.

    Args:
        message: the uplink.
        layout: the adapter layout.
        kept: rows the client's level keeps, per module.
        max_abs: largest allowed absolute entry.
        wire_dtype: the dtype of uploaded floating tensors (default: the layout's).
    """
    count = message.control.get(NUM_SAMPLES)
    if not isinstance(count, Tensor) or count.dtype != torch.int64 or count.numel() != 1:
        return "the sample count must be one int64 value"
    reason = check_sample_count(message.num_samples) or _check_keys(message, layout, kept)
    if reason:
        return reason
    rows: dict[str, Tensor] = {}
    for pair in layout.pairs:
        d_out, _, r = layout.shapes[pair.module]
        decoded = decode_rows(message.control, pair.module, d_out, kept[pair.module])
        if isinstance(decoded, str):
            return decoded
        rows[pair.module] = decoded
        b_like = _on_wire(layout.reference[pair.b_key], (kept[pair.module], r), wire_dtype)
        a_like = _on_wire(layout.reference[pair.a_key], layout.reference[pair.a_key].shape, wire_dtype)
        reason = (check_tensor(pair.a_key, message.tensors[pair.a_key], a_like, max_abs=max_abs)
                  or check_tensor(pair.b_key, message.tensors[pair.b_key], b_like, max_abs=max_abs))
        if reason:
            return reason
    for key in layout.head_keys:
        like = _on_wire(layout.reference[key], layout.reference[key].shape, wire_dtype)
        reason = check_tensor(key, message.tensors[key], like, max_abs=max_abs)
        if reason:
            return reason
    t = message.tensors
    return ParsedUplink({p.a_key: t[p.a_key] for p in layout.pairs}, {p.b_key: t[p.b_key] for p in layout.pairs},
                        rows, {k: t[k] for k in layout.head_keys}, message.num_samples)


def _on_wire(reference: Tensor, shape: tuple[int, ...] | torch.Size, wire_dtype: torch.dtype | None) -> Tensor:
    """A meta tensor of ``shape`` in the dtype an upload of ``reference`` must have."""
    floating = wire_dtype is not None and reference.is_floating_point()
    return torch.empty(tuple(shape), dtype=wire_dtype if floating else reference.dtype, device="meta")


def _check_keys(message: Message, layout: AdapterLayout, kept: Mapping[str, int]) -> str | None:
    expected = {k for p in layout.pairs for k in (p.a_key, p.b_key)} | set(layout.head_keys)
    got = set(message.tensors)
    if got != expected:
        return f"key mismatch: missing {sorted(expected - got)[:3]}, unexpected {sorted(got - expected)[:3]}"
    allowed = {NUM_SAMPLES} | {prefix + p.module for p in layout.pairs for prefix in (ROW_BITS, ROW_INDEX)
                               if kept[p.module] < layout.shapes[p.module][0]}
    extra = sorted(set(message.control) - allowed)
    if extra:
        return f"unexpected control entries {extra[:3]}"
    return None
