"""The server's gate for uplinks: who may reply, with what sample count, and how large an update may be.

Every strategy's aggregation runs each reply through :func:`screen_reply` as
it arrives, before folding it in (:class:`ScreenedStrategy` is that template). A
reply is judged in this order, and the first failure is its rejection reason:

1. **Sampled** -- the client was sampled for this round (the strategy opened
   the round with :meth:`ReplyGate.open` in ``configure_round``).
2. **Once** -- it is the client's first reply of the round; a later reply is a
   duplicate and is rejected, whatever the first was (the first is kept).
3. **Sample count** -- exactly one ``int64`` scalar, positive and at most the
   client's bound (:meth:`UplinkPolicy.sample_bound`: its shard size when the
   host knows it, never more than ``federate.max_sample_count``).
4. **The strategy's own check** -- keys, shapes, dtypes (the floating dtype is
   :attr:`UplinkPolicy.wire_dtype`), finiteness, per-entry magnitude and the
   update-norm bound (:meth:`UplinkPolicy.check_update`).

A rejected reply contributes nothing: the strategy's running sums only ever
see the accepted ones, and the global state changes only when the round is
finished, so a rejection leaves the global model bit for bit as it was.

**The update-norm rule** (:meth:`UplinkPolicy.update_bound`). For every
uploaded tensor ``k`` with ``n`` entries, the change it asks for must satisfy::

    ||delta_k||_2 <= max_update_ratio * max(||g_k||_2, update_rms_floor * sqrt(n))

where ``g_k`` is the global value it replaces. Relative to the global value,
an update may be ``max_update_ratio`` (10) times the tensor itself; the floor
``update_rms_floor * sqrt(n)`` (an RMS of 1 per entry) makes the bound
independent of the tensor's size and, crucially, non-zero when the global
value is zero: LoRA ``B`` starts at 0, so a purely relative bound would
reject every honest first-round update. With the defaults any update whose
root-mean-square entry change is at most 10 passes (honest LoRA, full-weight
and head updates are orders of magnitude smaller: entries move by about
``lr`` per optimiser step), while "every entry at 9,999" has an RMS of 9,999
and is rejected. The bound limits, but cannot remove, a malicious client's
influence: within it a client can still move the global tensor by up to its
weight times the bound.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from fs_gmfl.core.message import NUM_SAMPLES, Message, Reply
from fs_gmfl.core.protocol import RoundAggregation, RoundReport, Strategy
from fs_gmfl.core.validation import DEFAULT_MAX_ABS

#: default of ``federate.max_sample_count``: the largest sample count a client may claim when its shard is unknown.
DEFAULT_MAX_SAMPLES = 1_000_000
#: default of ``federate.max_update_ratio``.
DEFAULT_MAX_UPDATE_RATIO = 10.0
#: default of ``federate.update_rms_floor``.
DEFAULT_UPDATE_RMS_FLOOR = 1.0
#: the floating dtype clients upload in unless a host says otherwise.
DEFAULT_WIRE_DTYPE = torch.float32

T = TypeVar("T")


@dataclass
class UplinkPolicy:
    """Every bound the server applies to an uplink, in one place a host can set.

    Attributes:
        max_abs: largest allowed absolute entry of any uploaded float tensor.
        max_samples: largest sample count any client may claim (``federate.max_sample_count``).
        shard_sizes: each client's training-shard size where the host knows it
            (the embedded simulator does); a count above it is rejected.
        max_update_ratio: the ratio of the update-norm rule (0 turns the rule off).
        update_rms_floor: the per-entry RMS floor of the update-norm rule.
        wire_dtype: the dtype clients upload floating tensors in (the one
            place to change when clients upload in bf16 or fp16).
    """

    max_abs: float = DEFAULT_MAX_ABS
    max_samples: int = DEFAULT_MAX_SAMPLES
    shard_sizes: dict[int, int] = field(default_factory=dict)
    max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO
    update_rms_floor: float = DEFAULT_UPDATE_RMS_FLOOR
    wire_dtype: torch.dtype = DEFAULT_WIRE_DTYPE

    # -- sample counts -------------------------------------------------------------------------
    def sample_bound(self, client_id: int) -> int:
        """The largest count ``client_id`` may claim: its shard size if known, else ``max_samples``."""
        shard = self.shard_sizes.get(client_id)
        return self.max_samples if shard is None else min(int(shard), self.max_samples)

    def check_samples(self, client_id: int, message: Message) -> str | None:
        """Why the sample count of ``message`` is unacceptable (``None`` if it is one valid count)."""
        count = message.control.get(NUM_SAMPLES)
        if not isinstance(count, Tensor):
            return "sample count: missing"
        if count.dtype != torch.int64 or count.dim() != 0:
            return f"sample count: must be one int64 value, got {count.dtype} of shape {tuple(count.shape)}"
        n = int(count.item())
        if n <= 0:
            return f"sample count: {n} is not positive"
        bound = self.sample_bound(client_id)
        if n > bound:
            known = "its shard size" if client_id in self.shard_sizes else "federate.max_sample_count"
            return f"sample count: {n} is absurd, above {known} {bound}"
        return None

    # -- update norms --------------------------------------------------------------------------
    def update_bound(self, reference_norm: float, numel: int) -> float:
        """``max_update_ratio * max(reference_norm, update_rms_floor * sqrt(numel))`` (the module docstring)."""
        return self.max_update_ratio * max(reference_norm, self.update_rms_floor * math.sqrt(numel))

    def check_update(self, key: str, delta_norm: float, reference_norm: float, numel: int) -> str | None:
        """Why an update of L2 norm ``delta_norm`` to a tensor of norm ``reference_norm`` is too large."""
        if self.max_update_ratio <= 0:
            return None
        bound = self.update_bound(reference_norm, numel)
        if not math.isfinite(delta_norm) or delta_norm > bound:
            return (f"update norm: '{key}' changes by {delta_norm:.4g} (L2), above the bound {bound:.4g} "
                    f"(federate.max_update_ratio x max(global norm {reference_norm:.4g}, floor))")
        return None

    def check_delta(self, key: str, uploaded: Tensor, reference: Tensor) -> str | None:
        """:meth:`check_update` of ``uploaded - reference`` (float64, same shape)."""
        delta = float(torch.linalg.vector_norm(uploaded.to(torch.float64) - reference.to(torch.float64)))
        return self.check_update(key, delta, l2(reference), uploaded.numel())

    def check_deltas(self, items: Iterable[tuple[str, Tensor, Tensor]]) -> str | None:
        """The first failing :meth:`check_delta` over ``(key, uploaded, reference)`` triples."""
        if self.max_update_ratio <= 0:
            return None
        for key, uploaded, reference in items:
            reason = self.check_delta(key, uploaded, reference)
            if reason:
                return reason
        return None


def l2(t: Tensor) -> float:
    """The L2 norm of ``t``, in float64."""
    return float(torch.linalg.vector_norm(t.to(torch.float64))) if t.numel() else 0.0


class ReplyGate:
    """Which clients may reply in the open round, and which already did."""

    def __init__(self) -> None:
        self.round: int | None = None
        self.sampled: frozenset[int] = frozenset()

    def open(self, rnd: int, clients: Sequence[int]) -> None:
        """Round ``rnd`` is configured for exactly ``clients`` (called by ``configure_round``)."""
        self.round, self.sampled = rnd, frozenset(int(c) for c in clients)

    def close(self) -> None:
        """The round is aggregated: no further reply is admitted until the next :meth:`open`."""
        self.round, self.sampled = None, frozenset()

    def admit(self, rnd: int, client_id: int, seen: set[int]) -> str | None:
        """Why ``client_id`` may not reply in round ``rnd`` (``None`` if it may); records it in ``seen``."""
        if self.round != rnd or client_id not in self.sampled:
            return f"not sampled: client {client_id} was not sampled in round {rnd}"
        if client_id in seen:
            return f"duplicate reply: client {client_id} already replied in round {rnd}"
        seen.add(client_id)
        return None


def screen_reply(rnd: int, reply: Reply, seen: set[int], *, gate: ReplyGate, policy: UplinkPolicy,
                 check: Callable[[Reply], T | str | None]) -> tuple[str | None, T | None]:
    """Judge one reply of round ``rnd`` (the module docstring's order): ``(reason, None)`` or ``(None, parsed)``.

    Args:
        rnd: the round being aggregated.
        reply: the uplink.
        seen: the clients that already replied in this round (updated).
        gate: the strategy's gate, opened by its ``configure_round``.
        policy: the strategy's bounds.
        check: the strategy's own validation of one reply: a reason string to
            reject it, else anything (``None`` or a parsed form) to keep with it.
    """
    cid = reply.client_id
    reason = gate.admit(rnd, cid, seen) or policy.check_samples(cid, reply.message)
    if reason:
        return reason, None
    parsed = check(reply)
    if isinstance(parsed, str):
        return parsed, None
    return None, parsed


class ScreenedRound(RoundAggregation):
    """A :class:`ScreenedStrategy`'s round in progress: screen each reply as it arrives, fold the accepted ones.

    Holds the report and the ids seen so far; the running sums belong to the
    strategy (opened by :meth:`ScreenedStrategy.begin_fold`). No reply is kept.
    """

    def __init__(self, strategy: ScreenedStrategy, rnd: int) -> None:
        self.strategy = strategy
        self.rnd = rnd
        self.report = RoundReport()
        self.seen: set[int] = set()
        self.finished = False
        strategy.begin_fold(rnd)

    def add(self, reply: Reply) -> str | None:
        """Screen ``reply``; fold it in when accepted, else record why not (the first reason per client)."""
        if self.finished:
            raise RuntimeError(f"round {self.rnd} is already aggregated")
        s = self.strategy
        reason, parsed = screen_reply(self.rnd, reply, self.seen, gate=s.gate, policy=s.policy, check=s.check_reply)
        if reason:
            self.report.rejected.setdefault(reply.client_id, reason)
            return reason
        s.fold_reply(reply, parsed)
        self.report.accepted.append(reply.client_id)
        return None

    def finish(self) -> RoundReport:
        """Close the gate and let the strategy turn its running sums into the new global state."""
        if self.finished:
            raise RuntimeError(f"round {self.rnd} is already aggregated")
        self.finished = True
        self.strategy.gate.close()
        self.strategy.end_fold(self.rnd, self.report)
        return self.report


class ScreenedStrategy(Strategy):
    """A :class:`Strategy` whose aggregation is the template: screen each reply as it arrives, fold it, finish.

    The accept/reject rule is :func:`screen_reply`, written once. A method
    supplies its own check of one reply and three steps of a streaming fold:
    :meth:`begin_fold` (start empty running sums), :meth:`fold_reply` (add one
    accepted reply, then forget it) and :meth:`end_fold` (turn the sums into
    the new global state). Subclasses set ``gate`` (opened in
    ``configure_round``) and ``policy``.
    """

    gate: ReplyGate
    policy: UplinkPolicy

    def start_aggregation(self, rnd: int) -> ScreenedRound:
        """A :class:`ScreenedRound` for round ``rnd`` (opens the method's running sums)."""
        return ScreenedRound(self, rnd)

    @abc.abstractmethod
    def check_reply(self, reply: Reply) -> Any:
        """Why ``reply`` is unacceptable (a string), else ``None`` or a parsed form that :meth:`fold_reply` receives.

        Runs against the global state of the start of the round (the fold
        changes only running sums until :meth:`end_fold`).
        """

    @abc.abstractmethod
    def begin_fold(self, rnd: int) -> None:
        """Start round ``rnd``'s running sums (empty)."""

    @abc.abstractmethod
    def fold_reply(self, reply: Reply, parsed: Any) -> None:
        """Add one accepted reply (and what :meth:`check_reply` returned) to the running sums.

        Must not keep a reference to ``reply``, its tensors or ``parsed``
        (rejected replies never reach this method).
        """

    @abc.abstractmethod
    def end_fold(self, rnd: int, report: RoundReport) -> None:
        """Turn the running sums (maybe of no reply) into the new global state and drop them.

        ``report.accepted`` lists the folded clients in order; round metrics go into ``report.metrics``.
        """


def set_shard_sizes(strategy: object, sizes: Mapping[int, int]) -> None:
    """Tell a strategy's policy each client's shard size (a host that knows them; no-op without a policy)."""
    policy = getattr(strategy, "policy", None)
    if isinstance(policy, UplinkPolicy):
        policy.shard_sizes = {int(c): int(n) for c, n in sizes.items()}


def expected_float_dtype(reference: Tensor, policy: UplinkPolicy) -> torch.dtype:
    """The dtype an uploaded counterpart of ``reference`` must have: the wire dtype for floating tensors."""
    return policy.wire_dtype if reference.is_floating_point() else reference.dtype


def like_on_wire(reference: Mapping[str, Tensor], policy: UplinkPolicy) -> dict[str, Tensor]:
    """Meta tensors with ``reference``'s shapes and the dtypes uploads must have (for shape/dtype checks)."""
    return {k: torch.empty(v.shape, dtype=expected_float_dtype(v, policy), device="meta")
            for k, v in reference.items()}
