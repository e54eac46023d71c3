"""FedKRSO's wire format: what travels, as tensors, and its validation.

Downlink (server -> client ``n`` in round ``t``), all counted:

* ``control["krso.seeds"]``: the round's ``K`` seeds (int64, 8 bytes each);
* ``control["krso.schedule_seed"]``: seed of the client's interval draws (int64);
* ``control["krso.version"]``: the global version the payload brings the client to (``t - 1``, int64);
* the head ``Phi^{t-1}`` under its adapter keys;
* the catch-up, either a *replay* of the log entries of the rounds since the
  client's last sync, entry ``i`` being ``control["krso.replay_seeds/i"]``
  (the seeds whose averaged accumulator is non-zero, int64) and
  ``tensors["krso.replay/i/<weight name>"]`` (``[|U_i|, d_out, r]``), entries
  covering consecutive rounds up to ``krso.version``; or a *full sync*:
  ``tensors["<weight name>"]``, the targeted weights themselves.

Uplink (client -> server): ``tensors["krso.acc/<weight name>"]``
(``[|U_n|, d_out, r]``, one slice per used seed in increasing slot order), the
head, ``control["krso.slots"]`` (the used slot indices, uint8 when
``K <= 256``; absent when all ``K`` slots are sent) and the 8-byte sample count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fs_gmfl.core.fedkrso.ops import layer_rank
from fs_gmfl.core.message import NUM_SAMPLES, Message, samples_tensor, tensor_bytes
from fs_gmfl.core.targets import TargetLayer
from fs_gmfl.core.validation import DEFAULT_MAX_ABS, check_sample_count, check_tensor
from fs_gmfl.errors import InputError

SEEDS = "krso.seeds"
SCHEDULE_SEED = "krso.schedule_seed"
VERSION = "krso.version"
SLOTS = "krso.slots"
_REPLAY_SEEDS = "krso.replay_seeds/"
_REPLAY = "krso.replay/"
_ACC = "krso.acc/"
SEED_BYTES = 8


def acc_key(name: str) -> str:
    """Uplink key of one layer's accumulators."""
    return _ACC + name


def replay_seeds_key(index: int) -> str:
    """Downlink key of log entry ``index``'s seeds."""
    return f"{_REPLAY_SEEDS}{index}"


def replay_key(index: int, name: str) -> str:
    """Downlink key of log entry ``index``'s averaged accumulators of one layer."""
    return f"{_REPLAY}{index}/{name}"


def slot_dtype(num_seeds: int) -> torch.dtype:
    """Smallest integer type of a slot index: uint8 for ``K <= 256``, else int32."""
    return torch.uint8 if num_seeds <= 256 else torch.int32


def _to_wire(t: Tensor) -> Tensor:
    """A detached CPU copy (meta tensors, used for byte estimates, stay on the meta device)."""
    return t.detach().clone() if t.is_meta else t.detach().to("cpu", copy=True)


def _int64(value: int | Sequence[int]) -> Tensor:
    return torch.tensor(value, dtype=torch.int64)


@dataclass
class LogEntry:
    """One round's global update: the seeds with a non-zero average and the averages per layer."""

    round: int
    seeds: list[int]
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes this entry costs in a replay."""
        return SEED_BYTES * len(self.seeds) + sum(tensor_bytes(t) for t in self.tensors.values())


# -- downlink ----------------------------------------------------------------------------------------------------
def downlink_message(*, seeds: Sequence[int], schedule_seed: int, version: int, head: Mapping[str, Tensor],
                     replay: Sequence[LogEntry] = (), full: Mapping[str, Tensor] | None = None) -> Message:
    """A downlink with either a replay of ``replay`` (consecutive rounds ending at ``version``) or a full sync."""
    control = {SEEDS: _int64(list(seeds)), SCHEDULE_SEED: _int64(schedule_seed), VERSION: _int64(version)}
    tensors = {k: v.clone() for k, v in head.items()}
    if full is not None:
        tensors.update({k: v.clone() for k, v in full.items()})
    else:
        for i, entry in enumerate(replay):
            control[replay_seeds_key(i)] = _int64(entry.seeds).reshape(-1)
            tensors.update({replay_key(i, name): t.clone() for name, t in entry.tensors.items()})
    return Message(tensors, control)


@dataclass
class Downlink:
    """A parsed downlink."""

    seeds: list[int]
    schedule_seed: int
    version: int
    head: dict[str, Tensor]
    replay: list[LogEntry]
    full: dict[str, Tensor] | None


def _scalar(message: Message, key: str) -> int:
    t = message.control.get(key)
    if t is None or t.dtype != torch.int64 or t.numel() != 1:
        raise InputError(f"FedKRSO downlink lacks a valid '{key}'")
    return int(t.item())


def parse_downlink(message: Message, layers: Sequence[TargetLayer], *, num_seeds: int, rank: int,
                   head_keys: Sequence[str]) -> Downlink:
    """Read and check a downlink against the client's layers.

    Raises:
        InputError: a key is missing, or a tensor has the wrong shape.
    """
    seeds_t = message.control.get(SEEDS)
    if seeds_t is None or seeds_t.dtype != torch.int64 or tuple(seeds_t.shape) != (num_seeds,):
        raise InputError(f"FedKRSO downlink lacks '{SEEDS}' with {num_seeds} int64 seeds")
    missing_head = [k for k in head_keys if k not in message.tensors]
    if missing_head:
        raise InputError(f"FedKRSO downlink lacks the head tensor '{missing_head[0]}'")
    version = _scalar(message, VERSION)
    full = None
    entries: list[LogEntry] = []
    if any(layer.name in message.tensors for layer in layers):
        full = {layer.name: _checked(message, layer.name, layer.shape) for layer in layers}
    else:
        count = sum(1 for k in message.control if k.startswith(_REPLAY_SEEDS))
        for i in range(count):
            seeds = [int(s) for s in message.control[replay_seeds_key(i)].tolist()]
            tensors = {layer.name: _checked(message, replay_key(i, layer.name),
                                            (len(seeds), layer.d_out, layer_rank(layer, rank))) for layer in layers}
            entries.append(LogEntry(version - count + 1 + i, seeds, tensors))
    return Downlink([int(s) for s in seeds_t.tolist()], _scalar(message, SCHEDULE_SEED), version,
                    {k: message.tensors[k] for k in head_keys}, entries, full)


def _checked(message: Message, key: str, shape: tuple[int, ...]) -> Tensor:
    t = message.tensors.get(key)
    if t is None:
        raise InputError(f"FedKRSO downlink lacks '{key}'")
    if tuple(t.shape) != tuple(shape):
        raise InputError(f"FedKRSO downlink tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


# -- uplink ------------------------------------------------------------------------------------------------------
def uplink_message(accumulators: Mapping[int, Mapping[str, Tensor]], layers: Sequence[TargetLayer], *, rank: int,
                   num_seeds: int, head: Mapping[str, Tensor], num_samples: int, all_slots: bool,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Message:
    """The uplink of a client's per-seed accumulators (``{slot: {weight name: B-sum}}``) and head, on the CPU."""
    slots = list(range(num_seeds)) if all_slots else sorted(accumulators)
    tensors: dict[str, Tensor] = {}
    for layer in layers:
        shape = (layer.d_out, layer_rank(layer, rank))
        parts = [accumulators[s][layer.name] if s in accumulators else torch.zeros(shape, dtype=dtype, device=device)
                 for s in slots]
        stacked = torch.stack(parts) if parts else torch.zeros((0, *shape), dtype=dtype, device=device)
        tensors[acc_key(layer.name)] = _to_wire(stacked)
    tensors.update({k: _to_wire(v) for k, v in head.items()})
    control = {NUM_SAMPLES: samples_tensor(num_samples)}
    if not all_slots:
        control[SLOTS] = torch.tensor(slots, dtype=slot_dtype(num_seeds))
    return Message(tensors, control)


def check_slots(message: Message, *, num_seeds: int, all_slots: bool) -> tuple[list[int] | None, str | None]:
    """The slot indices of an uplink, or the reason they are unacceptable."""
    if all_slots:
        if SLOTS in message.control:
            return None, f"unexpected '{SLOTS}' (all {num_seeds} slots are sent)"
        return list(range(num_seeds)), None
    t = message.control.get(SLOTS)
    if t is None:
        return None, f"missing '{SLOTS}'"
    if t.dtype != slot_dtype(num_seeds) or t.dim() != 1:
        return None, f"'{SLOTS}' must be a 1-D {slot_dtype(num_seeds)} tensor, got {t.dtype} {tuple(t.shape)}"
    slots = [int(s) for s in t.tolist()]
    if any(s >= num_seeds for s in slots) or any(b <= a for a, b in zip(slots, slots[1:])):
        return None, f"'{SLOTS}' must be strictly increasing indices below {num_seeds}, got {slots[:8]}"
    return slots, None


def check_uplink(message: Message, *, layers: Sequence[TargetLayer], rank: int, num_seeds: int, all_slots: bool,
                 head: Mapping[str, Tensor], dtype: torch.dtype, max_abs: float = DEFAULT_MAX_ABS
                 ) -> tuple[list[int] | None, str | None]:
    """Validate a whole uplink before any of it is used: ``(slots, None)`` or ``(None, reason)``.

    ``dtype`` is the floating dtype uploads must have (accumulators and head).
    """
    reason = check_sample_count(message.num_samples)
    if reason:
        return None, reason
    extra_control = sorted(set(message.control) - {NUM_SAMPLES, SLOTS})
    if extra_control:
        return None, f"unexpected control tensors {extra_control[:3]}"
    slots, reason = check_slots(message, num_seeds=num_seeds, all_slots=all_slots)
    if reason or slots is None:
        return None, reason
    expected = {acc_key(layer.name): layer for layer in layers}
    got = set(message.tensors)
    if got != set(expected) | set(head):
        missing, extra = sorted(set(expected) | set(head) - got), sorted(got - set(expected) - set(head))
        return None, f"key mismatch: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, layer in expected.items():
        like = torch.empty((len(slots), layer.d_out, layer_rank(layer, rank)), dtype=dtype, device="meta")
        reason = check_tensor(key, message.tensors[key], like, max_abs=max_abs)
        if reason:
            return None, reason
    for key, ref in head.items():
        like = torch.empty(ref.shape, dtype=dtype if ref.is_floating_point() else ref.dtype, device="meta")
        reason = check_tensor(key, message.tensors[key], like, max_abs=max_abs)
        if reason:
            return None, reason
    return slots, None
