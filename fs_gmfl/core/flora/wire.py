"""FLoRA's wire format.

* downlink: the client's rank r_k (``flora.rank``, int16, 2 bytes) and the
  seed it re-initialises its LoRA factors from (``flora.seed``, int64,
  8 bytes); the head; and what rebuilds the merged base weights, by
  ``flora.downlink``:

  - ``dense``: ``flora.delta/<weight name>``, the accumulated merged update
    ``D`` of every adapted module (``d_out x d_in`` in the stored weight's
    layout, float32) once a round has been merged (absent before: ``D = 0``);
  - ``stacked``: ``flora.since`` and ``flora.upto`` (int32, 4 bytes each):
    the client's ``D`` must hold the rounds up to ``since`` (0: nothing) and
    holds those up to ``upto`` after this message; then either the stacked
    factors of every round merged in between, ``flora.stack/<round>/A/<weight
    name>`` (``R_t x d_in``) and ``.../B/...`` (``d_out x R_t``, float32, R_t
    the round's stacked rank), or, when that is larger or the rounds are no
    longer kept, ``D`` itself as in ``dense`` (it replaces the client's);

* uplink: every module's trained ``A_k`` (``r_k x d_in``) and ``B_k``
  (``d_out x r_k``) under the adapter keys, the head, ``num_samples``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fs_gmfl.core.flora.ops import MergedModule
from fs_gmfl.core.message import Message
from fs_gmfl.errors import InputError

DELTA_PREFIX = "flora.delta/"
STACK_PREFIX = "flora.stack/"
SEED = "flora.seed"
RANK = "flora.rank"
SINCE = "flora.since"
UPTO = "flora.upto"
#: the rank's wire dtype (ranks up to 32767).
RANK_DTYPE = torch.int16
#: the wire dtype of ``since`` and ``upto``.
ROUND_DTYPE = torch.int32
#: stacked factors of one round: per weight name, ``(A_stack, B_stack)``.
RoundStacks = Mapping[str, tuple[Tensor, Tensor]]


def delta_key(module: MergedModule) -> str:
    """The downlink key of a module's accumulated merged update."""
    return DELTA_PREFIX + module.weight_name


def stack_keys(rnd: int, module: MergedModule) -> tuple[str, str]:
    """The downlink keys of a module's ``A_stack`` and ``B_stack`` of round ``rnd``."""
    return f"{STACK_PREFIX}{rnd}/A/{module.weight_name}", f"{STACK_PREFIX}{rnd}/B/{module.weight_name}"


def downlink_message(delta: Mapping[str, Tensor] | None, head: Mapping[str, Tensor], modules: Sequence[MergedModule],
                     *, seed: int, rank: int, stacks: Mapping[int, RoundStacks] | None = None,
                     rounds: tuple[int, int] | None = None) -> Message:
    """One client's downlink.

    Args:
        delta: the merged updates by weight name (``None``: not sent).
        head: the head tensors.
        modules: the adapted modules.
        seed: the round's seed.
        rank: the client's rank.
        stacks: ``flora.downlink: stacked``: the stacked factors of each round to apply, by round.
        rounds: ``flora.downlink: stacked``: ``(since, upto)``.
    """
    tensors = {delta_key(m): delta[m.weight_name] for m in modules} if delta is not None else {}
    for rnd, round_stacks in sorted((stacks or {}).items()):
        for m in modules:
            a_key, b_key = stack_keys(rnd, m)
            tensors[a_key], tensors[b_key] = round_stacks[m.weight_name]
    tensors.update(head)
    control = {SEED: torch.tensor(int(seed), dtype=torch.int64), RANK: torch.tensor(int(rank), dtype=RANK_DTYPE)}
    if rounds is not None:
        control[SINCE], control[UPTO] = (torch.tensor(int(r), dtype=ROUND_DTYPE) for r in rounds)
    return Message(tensors, control)


@dataclass
class Downlink:
    """A parsed downlink (``since``/``upto`` are ``None`` in a dense downlink)."""

    delta: dict[str, Tensor] | None
    head: dict[str, Tensor]
    seed: int
    rank: int
    stacks: dict[int, dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)
    since: int | None = None
    upto: int | None = None


def _integer(message: Message, name: str, dtype: torch.dtype) -> int:
    t = message.control.get(name)
    if not isinstance(t, Tensor) or t.dtype != dtype or t.numel() != 1:
        raise InputError(f"FLoRA downlink lacks a valid '{name}' entry (one {dtype} value)")
    return int(t.item())


def _parse_delta(message: Message, modules: Sequence[MergedModule]) -> dict[str, Tensor] | None:
    present = [m for m in modules if delta_key(m) in message.tensors]
    if present and len(present) != len(modules):
        raise InputError(f"FLoRA downlink carries {len(present)} of {len(modules)} merged updates (all or none)")
    for m in present:
        if tuple(message.tensors[delta_key(m)].shape) != m.weight_shape:
            raise InputError(f"merged update '{delta_key(m)}' has shape {tuple(message.tensors[delta_key(m)].shape)}, "
                             f"expected {m.weight_shape}")
    return {m.weight_name: message.tensors[delta_key(m)] for m in present} if present else None


def _parse_stacks(message: Message, modules: Sequence[MergedModule]) -> dict[int, dict[str, tuple[Tensor, Tensor]]]:
    rounds = sorted({int(k[len(STACK_PREFIX):].split("/", 1)[0]) for k in message.tensors if k.startswith(STACK_PREFIX)
                     and k[len(STACK_PREFIX):].split("/", 1)[0].isdigit()})
    out: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
    for rnd in rounds:
        out[rnd] = {}
        for m in modules:
            a_key, b_key = stack_keys(rnd, m)
            a, b = message.tensors.get(a_key), message.tensors.get(b_key)
            if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] \
                    or a.shape[1] != m.d_in or b.shape[0] != m.d_out:
                raise InputError(f"FLoRA downlink's stacks of round {rnd} for '{m.weight_name}' are missing or "
                                 f"mis-shaped (A R x {m.d_in}, B {m.d_out} x R)")
            out[rnd][m.weight_name] = (a, b)
    return out


def parse_downlink(message: Message, modules: Sequence[MergedModule], head_keys: Sequence[str],
                   *, max_rank: int) -> Downlink:
    """The merged updates (all or none), the stacks (stacked downlinks), the head, the seed and the rank.

    Raises:
        InputError: a control entry is missing or malformed, the rank is outside ``[1, max_rank]``, some but not
            all merged updates are present or mis-shaped, a round's stacks are incomplete, or a head tensor is
            missing.
    """
    seed, rank = _integer(message, SEED, torch.int64), _integer(message, RANK, RANK_DTYPE)
    if not 1 <= rank <= max_rank:
        raise InputError(f"FLoRA downlink rank {rank} is outside [1, {max_rank}]")
    missing = [k for k in head_keys if k not in message.tensors]
    if missing:
        raise InputError(f"FLoRA downlink lacks the head tensor '{missing[0]}'")
    head = {k: message.tensors[k] for k in head_keys}
    delta = _parse_delta(message, modules)
    if SINCE not in message.control and UPTO not in message.control:
        return Downlink(delta, head, seed, rank)
    since, upto = _integer(message, SINCE, ROUND_DTYPE), _integer(message, UPTO, ROUND_DTYPE)
    stacks = _parse_stacks(message, modules)
    if not 0 <= since <= upto or any(not since < r <= upto for r in stacks) or (stacks and delta is not None):
        raise InputError(f"FLoRA downlink's rounds are inconsistent (since {since}, upto {upto}, stacks of rounds "
                         f"{sorted(stacks)}, dense update {'present' if delta is not None else 'absent'})")
    return Downlink(delta, head, seed, rank, stacks, since, upto)
