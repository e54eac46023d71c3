"""HAFL server: importance scores, per-client component selection, validation and rank-1 aggregation.

Su, Yan, Deng, "Federated LLMs Fine-tuned with Adaptive Importance-Aware
LoRA" (HAFL, arXiv 2411.06581, ICC 2025); spec ``../shared/specs/HAFL.md``.

Wire format: :mod:`fs_gmfl.core.hafl.wire`.

As a GMFL base (:mod:`fs_gmfl.core.gmfl.base`) a mask unit is one adapted
module, its ``A`` and ``B`` together: HAFL's unit of aggregation and of
truncation is the rank-1 component ``b_i a_i``, which lives in both factors,
so freezing one factor alone would cut every component of the module in half.
A frozen module is still sent (clients need it in the forward pass) but is
neither trained nor uploaded (no factors, no index row) and keeps its value;
HAFL's component selection and aggregation of the other modules are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fs_gmfl.core.adapter import HEAD, LoraPair, kind_of, lora_pairs
from fs_gmfl.core.fedavg.ops import WeightedSum
from fs_gmfl.core.gmfl.base import whole_units
from fs_gmfl.core.hafl import ops
from fs_gmfl.core.hafl.config import HAFLConfig
from fs_gmfl.core.hafl.importance import ImportanceTracker
from fs_gmfl.core.hafl.wire import INDEX_DTYPES, INDICES, N_TRAIN, SCORES, index_dtype
from fs_gmfl.core.message import NUM_SAMPLES, Message, Reply
from fs_gmfl.core.protocol import RoundReport
from fs_gmfl.core.uplinks import ReplyGate, ScreenedStrategy, UplinkPolicy, expected_float_dtype
from fs_gmfl.core.validation import DEFAULT_MAX_ABS, check_tensors


@dataclass
class _RoundSums:
    """The open round's running sums: one :class:`~fs_gmfl.core.hafl.ops.ComponentSums` per module, the heads."""

    modules: list[ops.ComponentSums]
    heads: WeightedSum
    accepted: int = 0
    contributors: int = 0


class HAFLStrategy(ScreenedStrategy):
    """Server side of ITALoRA / IFALoRA / IFZLoRA / HomLoRA.

    Args:
        initial: the initial global adapter (rank-r_max LoRA factors and head).
        config: the ``hafl`` configuration.
        trained: ``n_k`` of every client id (components it trains per module).
        lr: the clients' learning rate (eq. 4).
        max_abs: uploads with a larger absolute entry are rejected (``policy.max_abs``).

    Attributes:
        policy: the uplink bounds (:class:`~fs_gmfl.core.uplinks.UplinkPolicy`).
    """

    def __init__(self, initial: Mapping[str, Tensor], config: HAFLConfig, *, trained: Sequence[int], lr: float,
                 max_abs: float = DEFAULT_MAX_ABS) -> None:
        self.config = config
        self.name = f"hafl-{config.scheme}-{config.aggregation}"
        self.global_state = {k: v.detach().clone() for k, v in initial.items()}
        self.pairs: list[LoraPair] = lora_pairs(self.global_state)
        if not self.pairs:
            raise ValueError("HAFL needs LoRA factors in the adapter")
        self.rank = int(self.global_state[self.pairs[0].a_key].shape[0])
        self.head_keys = [k for k in self.global_state if kind_of(k) == HEAD] if config.train_head else []
        self.trained = list(trained)
        self.policy = UplinkPolicy(max_abs=max_abs)
        self.gate = ReplyGate()
        self.tracker = ImportanceTracker(self.pairs, self.rank, lr=lr, beta1=config.beta1, beta2=config.beta2,
                                         reduce=config.score_reduce)
        self.pending: dict[int, Tensor] = {}
        self.active_rows: list[int] = list(range(len(self.pairs)))
        self._sums: _RoundSums | None = None

    # -- GMFL base (fs_gmfl.core.gmfl.base) ----------------------------------------------------
    def mask_units(self) -> dict[str, tuple[str, ...]]:
        """One unit per adapted module: its ``A`` and ``B`` (a rank-1 component spans both)."""
        return {pair.module: (pair.a_key, pair.b_key) for pair in self.pairs}

    def unit_values(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Each module's global ``A`` and ``B``."""
        return {p.module: (self.global_state[p.a_key].clone(), self.global_state[p.b_key].clone())
                for p in self.pairs}

    def set_frozen(self, keys: frozenset[str]) -> None:
        """Modules whose ``A`` and ``B`` are in ``keys`` are no longer uploaded or aggregated."""
        frozen = set(whole_units([(p.a_key, p.b_key) for p in self.pairs], keys, method="HAFL"))
        self.active_rows = [row for row in range(len(self.pairs)) if row not in frozen]

    # -- selection and downlink ----------------------------------------------------------------
    def selection(self, n: int, scores: Tensor | None = None) -> Tensor:
        """Top-``n`` components of every module (``modules x n``, best first) under the current scores."""
        scores = self.tracker.scores() if scores is None else scores
        if n == 0:
            return torch.zeros(len(self.pairs), 0, dtype=torch.long)
        return torch.stack([ops.top_components(row, n) for row in scores])

    def configure_round(self, rnd: int, clients: Sequence[int]) -> dict[int, Message]:
        """Scores to every sampled client, with the truncated (truncation) or full (freezing) factors."""
        scores = self.tracker.scores()
        self.gate.open(rnd, clients)
        self.pending = {}
        out = {}
        for cid in clients:
            selected = self.selection(self.trained[cid], scores)
            self.pending[cid] = selected
            out[cid] = self._downlink(selected, scores)
        return out

    def _downlink(self, selected: Tensor, scores: Tensor) -> Message:
        tensors: dict[str, Tensor] = {}
        for row, pair in enumerate(self.pairs):
            a, b = self.global_state[pair.a_key], self.global_state[pair.b_key]
            if self.config.scheme == "truncation":
                tensors[pair.a_key], tensors[pair.b_key] = ops.take_components(a, b, selected[row])
            else:
                tensors[pair.a_key], tensors[pair.b_key] = a.clone(), b.clone()
        tensors.update({k: self.global_state[k].clone() for k in self.head_keys})
        control = {SCORES: scores.clone()}
        if self.config.scheme == "freezing":
            control[N_TRAIN] = torch.tensor(selected.shape[1], dtype=index_dtype(self.rank))
        return Message(tensors, control)

    # -- validation --------------------------------------------------------------------------
    def check_reply(self, reply: Reply) -> str | None:
        """Why an uplink is unacceptable (``None`` if it is fine); nothing is used before this passes."""
        selected = self.pending.get(reply.client_id)
        if selected is None:
            return "client was not sampled this round"
        msg = reply.message
        extra = set(msg.control) - {NUM_SAMPLES, INDICES}
        if extra:
            return f"unexpected control entries {sorted(extra)}"
        reason = self._check_indices(msg.control.get(INDICES), selected[self.active_rows])
        if reason:
            return reason
        expected = self._expected_shapes(selected.shape[1])
        return (check_tensors(msg.tensors, expected, expected_keys=set(expected), max_abs=self.policy.max_abs)
                or self.policy.check_deltas(self._deltas(msg)))

    def _deltas(self, msg: Message) -> list[tuple[str, Tensor, Tensor]]:
        """``(key, uploaded, global counterpart)``: each unfrozen module's components (by index) and the head."""
        indices = msg.control[INDICES].to(torch.long)
        out = []
        if indices.shape[1]:
            for i, pair in enumerate(self._active_pairs()):
                a, b = ops.take_components(self.global_state[pair.a_key], self.global_state[pair.b_key], indices[i])
                out += [(pair.a_key, msg.tensors[pair.a_key], a), (pair.b_key, msg.tensors[pair.b_key], b)]
        return out + [(k, msg.tensors[k], self.global_state[k]) for k in self.head_keys]

    def _check_indices(self, indices: object, selected: Tensor) -> str | None:
        if not isinstance(indices, Tensor) or indices.dtype not in INDEX_DTYPES:
            return "indices: missing or not an integer tensor"
        if tuple(indices.shape) != tuple(selected.shape):
            return f"indices: shape {tuple(indices.shape)}, expected {tuple(selected.shape)} (unfrozen modules x n_k)"
        idx = indices.to(torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.rank):
            return f"indices: values outside [0, {self.rank})"
        for row, assigned in zip(idx, selected):
            if row.unique().numel() != row.numel():
                return f"indices: duplicate component in {row.tolist()}"
            if set(row.tolist()) != set(assigned.tolist()):
                return (f"indices: components {sorted(row.tolist())} differ from the assigned "
                        f"{sorted(assigned.tolist())}")
        return None

    def _expected_shapes(self, n: int) -> dict[str, Tensor]:
        shapes: dict[str, Tensor] = {}
        if n:
            for pair in self._active_pairs():
                a, b = self.global_state[pair.a_key], self.global_state[pair.b_key]
                shapes[pair.a_key] = torch.empty(n, a.shape[1], dtype=expected_float_dtype(a, self.policy),
                                                 device="meta")
                shapes[pair.b_key] = torch.empty(b.shape[0], n, dtype=expected_float_dtype(b, self.policy),
                                                 device="meta")
        shapes.update({k: torch.empty(self.global_state[k].shape, device="meta",
                                      dtype=expected_float_dtype(self.global_state[k], self.policy))
                       for k in self.head_keys})
        return shapes

    # -- aggregation (a streaming fold: running sums per module, then one update) -------------
    def begin_fold(self, rnd: int) -> None:
        """Empty running sums: per module GMFL has not frozen its components' sums, and the heads'."""
        self._sums = _RoundSums([ops.ComponentSums(self.global_state[p.a_key], self.global_state[p.b_key])
                                 for p in self._active_pairs()], WeightedSum(self.head_keys))

    def fold_reply(self, reply: Reply, parsed: None) -> None:
        """Add one accepted uplink: its components (weighted per the options) and its head (by samples)."""
        sums, msg = self._sums, reply.message
        sums.accepted += 1
        if self.head_keys:
            sums.heads.add(msg.tensors, msg.num_samples)
        if msg.control[INDICES].shape[1] == 0:
            return
        sums.contributors += 1
        updates = self._component_updates(msg)
        zero_padding = self.config.aggregation == "zero_padding"
        for module, update, w in zip(sums.modules, updates, self._client_weights(updates, msg.num_samples)):
            module.add(update, torch.full_like(w, float(w[0])) if zero_padding else w)

    def end_fold(self, rnd: int, report: RoundReport) -> None:
        """Aggregate each module's components, FedAvg the head, update the scores."""
        sums, self._sums = self._sums, None
        self.pending = {}
        if not sums.accepted:
            return
        old = self.global_state
        new = dict(old)
        if sums.contributors:
            for pair, module in zip(self._active_pairs(), sums.modules):
                average = module.zero_padding_average if self.config.aggregation == "zero_padding" \
                    else module.adaptive_average
                new[pair.a_key], new[pair.b_key] = average(old[pair.a_key], old[pair.b_key])
        if self.head_keys:
            heads = sums.heads.average({k: expected_float_dtype(old[k], self.policy) for k in self.head_keys})
            new.update({k: v.to(old[k].dtype) for k, v in heads.items()})
        self.global_state = new
        if sums.contributors:  # a round that changed no component carries no importance information
            self.tracker.observe(old, new)
        updated = torch.zeros(len(self.pairs), self.rank, dtype=torch.bool)  # a frozen module is not updated
        for row, module in zip(self.active_rows, sums.modules):
            updated[row] = module.count > 0
        report.metrics["components_updated_fraction"] = float(updated.float().mean())

    def _component_updates(self, msg: Message) -> list[ops.ComponentUpdate]:
        indices = msg.control[INDICES].to(torch.long)
        return [ops.ComponentUpdate(indices[i], msg.tensors[p.a_key], msg.tensors[p.b_key])
                for i, p in enumerate(self._active_pairs())]

    def _active_pairs(self) -> list[LoraPair]:
        """The modules GMFL has not frozen (all of them without GMFL), in module order."""
        return [self.pairs[row] for row in self.active_rows]

    def _client_weights(self, client_updates: list[ops.ComponentUpdate], n_samples: int) -> list[Tensor]:
        """One client's weights: per module, one per uploaded component (spec eq. 14 and its options)."""
        cfg = self.config
        mode = "datasize" if cfg.aggregation == "fedavg" else cfg.weighting
        if mode == "norm":
            per_module = [self._norm_weights(row, u) for row, u in zip(self.active_rows, client_updates)]
            if cfg.norm_granularity == "model":
                total = sum(float(w.sum()) if cfg.norm_scope == "rank1" else float(w[0]) for w in per_module)
                per_module = [torch.full((u.indices.numel(),), total, dtype=ops.F64) for u in client_updates]
            return per_module
        value = float(n_samples) if mode == "datasize" else 1.0
        return [torch.full((u.indices.numel(),), value, dtype=ops.F64) for u in client_updates]

    def _norm_weights(self, row: int, u: ops.ComponentUpdate) -> Tensor:
        scope, n = self.config.norm_scope, u.indices.numel()
        if scope == "rank1":
            return ops.rank1_norms(u.a_rows, u.b_cols)
        a, b = u.a_rows, u.b_cols
        if scope == "full" and self.config.scheme == "freezing":
            pair = self.pairs[row]
            a, b = ops.scatter_components(self.global_state[pair.a_key], self.global_state[pair.b_key], u)
        return torch.full((n,), ops.product_norm(a, b), dtype=ops.F64)

    # -- reporting / persistence -------------------------------------------------------------
    def global_adapter(self) -> dict[str, Tensor]:
        """The global adapter (a copy)."""
        return {k: v.clone() for k, v in self.global_state.items()}

    def truncated_adapter(self, n: int, *, b_scale: float = 1.0) -> dict[str, Tensor]:
        """The global adapter keeping only each module's top-``n`` components (what a rank-n client deploys)."""
        out = self.global_adapter()
        for row, selected in enumerate(self.selection(n)):
            pair = self.pairs[row]
            out[pair.a_key], out[pair.b_key] = ops.truncated_factors(out[pair.a_key], out[pair.b_key], selected,
                                                                     b_scale=b_scale)
        return out

    def evaluation_adapters(self) -> dict[str, dict[str, Tensor]]:
        """``rank_<n>``: the global model truncated to each profile's n_k < r_max (``eval_truncated_ranks``)."""
        if not self.config.eval_truncated_ranks:
            return {}
        per_rank = self.config.scaling == "peft_per_rank"
        ranks = sorted({n for n in self.trained if 0 < n < self.rank})
        return {f"rank_{n}": self.truncated_adapter(n, b_scale=self.rank / n if per_rank else 1.0) for n in ranks}

    def state_dict(self) -> dict[str, Any]:
        """Global tensors, importance state, client capacities and the current round's assignment."""
        return {"global": self.global_adapter(), "importance": self.tracker.state_dict(),
                "trained": list(self.trained), "pending": {c: s.clone() for c, s in self.pending.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if set(state["global"]) != set(self.global_state):
            raise ValueError("checkpoint adapter keys do not match this model")
        self.global_state = {k: v.clone() for k, v in state["global"].items()}
        self.tracker.load_state_dict(state["importance"])
        self.trained = [int(n) for n in state["trained"]]
        self.pending = {int(c): s.clone() for c, s in state["pending"].items()}
