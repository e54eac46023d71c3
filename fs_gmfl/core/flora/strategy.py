"""FLoRA's server (spec GMFL.md section 7.5): stacking of the round's LoRA modules, merged into the base weights.

Global state: the accumulated merged update ``D`` of every adapted module
(``d_out x d_in`` in the stored weight's layout, float32), the head, and how
many rounds were merged; the base weights ``W0`` are the host's initial
backbone (rebuilt from the seed, not checkpointed). The global model is
``W0 + D`` with no LoRA branch (``B = 0``) and the head.

Per round: every sampled client receives what rebuilds ``W0 + D``
(``flora.downlink``: ``D`` itself, or the stacked factors of the rounds it
missed), the head, its rank r_k and the round's seed
(:mod:`fs_gmfl.core.flora.wire`), trains fresh rank-r_k LoRA modules and
uploads them; the server keeps ``n_k s_k A_k`` and ``B_k`` of each accepted
reply (:class:`~fs_gmfl.core.flora.ops.StackFold`: one LoRA per client of the
round, ``sum_k r_k (d_in + d_out)`` values per module) and folds the head into
a sample-weighted FedAvg; at the round's end ``D <- D + B_stack A_stack``
(:func:`~fs_gmfl.core.flora.ops.add_stacked`, the merge clients repeat bit
for bit). Under ``flora.downlink: stacked`` the server also keeps the stacks
of the last rounds (at most the size of one ``D``: older rounds are dropped,
and a client that would need them receives ``D``) and the round each client
was last brought to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fs_gmfl.core.fedavg.ops import WeightedSum
from fs_gmfl.core.flora.config import FLoRAConfig
from fs_gmfl.core.flora.ops import MergedModule, StackFold, add_stacked, fresh_factors, merged_modules, merged_weight
from fs_gmfl.core.flora.wire import RoundStacks, downlink_message
from fs_gmfl.core.hafl.profiles import client_capacities
from fs_gmfl.core.message import Message, Reply
from fs_gmfl.core.protocol import RoundReport
from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.core.uplinks import ReplyGate, ScreenedStrategy, UplinkPolicy, expected_float_dtype, like_on_wire
from fs_gmfl.core.validation import DEFAULT_MAX_ABS, check_tensors

if TYPE_CHECKING:
    from fs_gmfl.config.schema import RunConfig


def round_seed(run_seed: int, rnd: int) -> int:
    """The seed of round ``rnd``'s fresh LoRA modules (sent to the clients as ``flora.seed``)."""
    return derive_seed(run_seed, "flora-round", rnd)


class FLoRAStrategy(ScreenedStrategy):
    """FLoRA's server: merged updates ``D`` per module, FedAvg'd head, per-client ranks.

    Args:
        modules: the adapted modules (:func:`~fs_gmfl.core.flora.ops.merged_modules`).
        base: ``W0`` of every module by weight name (read only; shared with the client side in one process).
        initial: the initial adapter (LoRA factors and head) by adapter key.
        ranks: each client's rank r_k, by client id.
        rank: the configured rank r.
        alpha: the configured ``lora_alpha``.
        config: the ``flora`` section (its scaling).
        init: ``llm.adapter.args[0].init_lora_weights``.
        seed: the run seed.
        max_abs: uploads with a larger absolute entry are rejected.
    """

    def __init__(self, modules: Sequence[MergedModule], base: Mapping[str, Tensor], initial: Mapping[str, Tensor],
                 *, ranks: Sequence[int], rank: int, alpha: float, config: FLoRAConfig, init: str, seed: int,
                 max_abs: float = DEFAULT_MAX_ABS) -> None:
        self.name = "flora"
        self.modules = list(modules)
        self.base = base
        self.lora_keys = [k for m in self.modules for k in (m.pair.a_key, m.pair.b_key)]
        self.head = {k: v.detach().clone() for k, v in initial.items() if k not in self.lora_keys}
        self.lora_like = {k: initial[k] for k in self.lora_keys}
        self.ranks = [int(r) for r in ranks]
        self.rank, self.alpha, self.config, self.init, self.seed = rank, alpha, config, init, seed
        self.delta = {m.weight_name: torch.zeros(m.weight_shape, device=base[m.weight_name].device)
                      for m in self.modules}
        self.rounds_merged = 0
        self.log: dict[int, RoundStacks] = {}  # flora.downlink stacked: the stacks of the last rounds
        self.log_floor = 0  # rounds up to this one are no longer in the log
        self.client_sync: dict[int, int] = {}  # flora.downlink stacked: the round each client's D holds
        self.policy = UplinkPolicy(max_abs=max_abs)
        self.gate = ReplyGate()
        self._stacks: StackFold | None = None
        self._heads: WeightedSum | None = None
        self._references: dict[int, dict[str, Tensor]] = {}
        self._seed = round_seed(seed, 1)
        self._stacked_rank = 0

    def scaling(self, client_rank: int) -> float:
        """``s_k``, the LoRA scaling a rank-``client_rank`` client trains with (``flora.scaling``)."""
        return self.config.client_alpha(self.alpha, client_rank, self.rank) / client_rank

    # -- downlink ----------------------------------------------------------------------------
    def configure_round(self, rnd: int, clients: Sequence[int]) -> dict[int, Message]:
        """Per client: what rebuilds ``W0 + D`` (``flora.downlink``), the head, the round's seed and its rank.

        Every downlink of the round refers to one copy of ``D``, the head and the logged stacks.
        """
        self.gate.open(rnd, clients)
        delta = {k: v.clone() for k, v in self.delta.items()} if self.rounds_merged else None
        head = {k: v.clone() for k, v in self.head.items()}
        seed = round_seed(self.seed, rnd)
        if self.config.downlink == "dense":
            return {cid: downlink_message(delta, head, self.modules, seed=seed, rank=self.ranks[cid])
                    for cid in clients}
        return {cid: self._stacked_downlink(rnd, cid, delta, head, seed) for cid in clients}

    def _stacked_downlink(self, rnd: int, cid: int, delta: dict[str, Tensor] | None, head: dict[str, Tensor],
                          seed: int) -> Message:
        """The stacks of the rounds merged since the client's last round, or ``D`` when smaller or no longer kept."""
        since, upto = self.client_sync.get(cid, 0), rnd - 1
        rounds = {t: stacks for t, stacks in self.log.items() if since < t <= upto}
        stacked_bytes = sum(4 * (a.numel() + b.numel()) for stacks in rounds.values() for a, b in stacks.values())
        use_stacks = delta is None or (since >= self.log_floor and stacked_bytes <= self.dense_bytes())
        self.client_sync[cid] = upto
        return downlink_message(None if use_stacks else delta, head, self.modules, seed=seed, rank=self.ranks[cid],
                                stacks=rounds if use_stacks else None, rounds=(since, upto))

    def dense_bytes(self) -> int:
        """Bytes of ``D`` on the wire (float32)."""
        return sum(4 * m.d_out * m.d_in for m in self.modules)

    # -- aggregation -------------------------------------------------------------------------
    def begin_fold(self, rnd: int) -> None:
        """Empty stacks per module and the head's FedAvg."""
        self._stacks = StackFold([m.weight_name for m in self.modules])
        self._heads = WeightedSum(list(self.head))
        self._seed = round_seed(self.seed, rnd)
        self._references = {}
        self._stacked_rank = 0

    def reference(self, client_rank: int) -> dict[str, Tensor]:
        """What a rank-``client_rank`` client started from this round: fresh factors and the global head."""
        if client_rank not in self._references:
            fresh = fresh_factors(self.modules, self._seed, rank=client_rank, init=self.init)
            self._references[client_rank] = {**fresh, **self.head}
        return self._references[client_rank]

    def check_reply(self, reply: Reply) -> str | int:
        """Why an uplink is unacceptable (keys, rank-r_k shapes, wire dtype, values, update norms), else its rank."""
        client_rank = self.ranks[reply.client_id]
        reference = self.reference(client_rank)
        tensors, policy = reply.message.tensors, self.policy
        reason = (check_tensors(tensors, like_on_wire(reference, policy), expected_keys=list(reference),
                                max_abs=policy.max_abs)
                  or policy.check_deltas((k, tensors[k], reference[k].to(tensors[k].device)) for k in reference))
        return reason or client_rank

    def fold_reply(self, reply: Reply, parsed: int) -> None:
        """Keep ``n_k s_k A_k`` and ``B_k`` of every module; fold the sample-weighted head."""
        tensors, n = reply.message.tensors, reply.message.num_samples
        factors = {m.weight_name: (tensors[m.pair.a_key], tensors[m.pair.b_key]) for m in self.modules}
        self._stacks.add(factors, self.scaling(parsed), n)
        self._heads.add(tensors, n)
        self._stacked_rank += parsed

    def end_fold(self, rnd: int, report: RoundReport) -> None:
        """``D <- D + B_stack A_stack`` and the head's FedAvg; nothing changes without an accepted reply."""
        fold, heads, self._stacks, self._heads = self._stacks, self._heads, None, None
        self._references = {}
        report.metrics["stacked_rank"] = float(self._stacked_rank)
        if not fold.count:
            return
        stacks = fold.stacks()
        for m in self.modules:
            self.delta[m.weight_name] = add_stacked(self.delta[m.weight_name], m, *stacks[m.weight_name])
        if self.head:
            average = heads.average({k: expected_float_dtype(v, self.policy) for k, v in self.head.items()})
            self.head = {k: average[k].to(v.dtype) for k, v in self.head.items()}
        self.rounds_merged += 1
        if self.config.downlink == "stacked":
            self._log(rnd, stacks)

    def _log(self, rnd: int, stacks: RoundStacks) -> None:
        """Keep round ``rnd``'s stacks; drop the oldest rounds while the log is larger than ``D``."""
        self.log[rnd] = stacks
        dense = self.dense_bytes()
        while self.log and sum(4 * (a.numel() + b.numel()) for s in self.log.values() for a, b in s.values()) > dense:
            self.log_floor = min(self.log)
            del self.log[self.log_floor]

    # -- reporting / persistence -------------------------------------------------------------
    def global_adapter(self) -> dict[str, Tensor]:
        """The global model: merged base weights ``W0 + D`` by weight name, zero LoRA factors, the head."""
        out = {m.weight_name: merged_weight(self.base[m.weight_name], self.delta[m.weight_name])
               for m in self.modules}
        out.update({k: torch.zeros_like(v) for k, v in self.lora_like.items()})
        out.update({k: v.clone() for k, v in self.head.items()})
        return out

    def round_metrics(self) -> dict[str, float]:
        """The number of rounds merged so far."""
        return {"rounds_merged": float(self.rounds_merged)}

    def state_dict(self) -> dict[str, Any]:
        """The merged updates, the head, the merge count and (``flora.downlink: stacked``) the logged stacks and
        the clients' sync rounds; ``W0`` is the seeded backbone's."""
        return {"delta": {k: v.clone() for k, v in self.delta.items()},
                "head": {k: v.clone() for k, v in self.head.items()}, "rounds_merged": self.rounds_merged,
                "log": {int(t): {w: (a.clone(), b.clone()) for w, (a, b) in s.items()} for t, s in self.log.items()},
                "log_floor": self.log_floor, "client_sync": {int(c): int(t) for c, t in self.client_sync.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same modules and head)."""
        if set(state["delta"]) != set(self.delta) or set(state["head"]) != set(self.head):
            raise ValueError("checkpoint FLoRA modules or head do not match this model")
        for name, value in state["delta"].items():
            if value.shape != self.delta[name].shape:
                raise ValueError(f"checkpoint merged update '{name}' has shape {tuple(value.shape)}")
        self.delta = {k: state["delta"][k].clone() for k in self.delta}
        self.head = {k: state["head"][k].clone() for k in self.head}
        self.rounds_merged = int(state["rounds_merged"])
        self.log = {int(t): {w: (a.clone(), b.clone()) for w, (a, b) in s.items()} for t, s in state["log"].items()}
        self.log_floor = int(state["log_floor"])
        self.client_sync = {int(c): int(t) for c, t in state["client_sync"].items()}

    def clients_reset(self) -> None:
        """The clients restart from the initial model (a host resuming its server only): forget their sync rounds."""
        self.client_sync.clear()

def strategy_for(cfg: RunConfig, initial: dict[str, Tensor], model: nn.Module) -> tuple[FLoRAStrategy, list[int]]:
    """The server strategy on ``model``'s adapted modules (``W0`` copied from it) and each client's profile index."""
    modules = merged_modules(model, initial)
    params = dict(model.named_parameters())
    base = {m.weight_name: params[m.weight_name].detach().clone() for m in modules}
    profile_of, ranks = client_capacities(cfg.flora.rank_profiles(), num_clients=cfg.federate.client_num,
                                          r_max=cfg.lora.r, seed=cfg.seed)
    strategy = FLoRAStrategy(modules, base, initial, ranks=ranks, rank=cfg.lora.r, alpha=cfg.lora.lora_alpha,
                             config=cfg.flora, init=cfg.lora.init_lora_weights, seed=cfg.seed)
    return strategy, profile_of
