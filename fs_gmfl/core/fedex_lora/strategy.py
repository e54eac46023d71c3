"""FedEx-LoRA's server (spec GMFL.md section 7.2): uniform FedAvg of the factors, the residual folded into W0.

:class:`FedExLoraStrategy` is FedIT's :class:`~fs_gmfl.core.fedavg.strategy.LoraFedAvg`
(uplink checks, GMFL base interface: one LoRA tensor per mask unit) with
three changes:

* every accepted client weighs the same (``Ā = mean_k A_k``, ``B̄``, head alike),
  not its sample count;
* the server also keeps, as global state, the base weight of every adapted
  module with the residuals of all rounds folded in
  (``W0 + sum_t (alpha/r)(mean_k B_k A_k - B̄ Ā)_t``); it is saved by
  :meth:`state_dict`, so a resumed run continues bit for bit;
* the downlink carries those base weights (:mod:`.wire`), and
  :meth:`global_adapter` returns them under their parameter names, so the
  hosts evaluate and checkpoint the global model with the residual in it.

Under GMFL a frozen factor is identical on every client (each loads the
global value), so a module with a frozen factor has no residual:
``mean_k(B_k A) - mean_k(B_k) A = 0`` (spec 7.2, edge case 11). Its product is
therefore not summed and its base weight is left exactly as it is.

Running sums of a round: FedIT's float64 sums of the trained tensors and, for
each module with both factors trained, a float64 ``d_out x d_in`` sum of
``B_k A_k`` (:class:`~fs_gmfl.core.fedex_lora.ops.ProductSums`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fs_gmfl.core.fedavg.strategy import LoraFedAvg
from fs_gmfl.core.fedex_lora.ops import ProductSums, ResidualTarget, fold_residual, residual
from fs_gmfl.core.message import Message, Reply
from fs_gmfl.core.protocol import RoundReport

#: the round metric: the Frobenius norm of all residuals folded in this round.
RESIDUAL_NORM = "fedex_residual_norm"


class FedExLoraStrategy(LoraFedAvg):
    """FedEx-LoRA: uniform mean of A, B and the head; ``(alpha/r)(mean_k B_k A_k - B̄ Ā)`` folded into each W0.

    Args:
        initial: the initial global adapter (LoRA factors and head).
        targets: the adapted modules (:func:`~fs_gmfl.core.fedex_lora.wire.residual_targets`).
        weights: their initial base weights ``W0`` by parameter name.
        **kwargs: passed to :class:`~fs_gmfl.core.fedavg.strategy.LoraFedAvg` (``max_abs``).
    """

    def __init__(self, initial: Mapping[str, Tensor], targets: Sequence[ResidualTarget],
                 weights: Mapping[str, Tensor], **kwargs: Any) -> None:
        super().__init__(initial, variant="fedit", downlink="stateless", **kwargs)
        self.name = "fedex_lora"
        self.targets = list(targets)
        self.base_weights = {t.weight: weights[t.weight].detach().clone() for t in self.targets}
        self._products: ProductSums | None = None

    # -- downlink ------------------------------------------------------------------------------
    def configure_round(self, rnd: int, clients: Sequence[int]) -> dict[int, Message]:
        """FedIT's downlink (the whole adapter) plus every base weight with the residuals folded in (one copy)."""
        downlinks = super().configure_round(rnd, clients)
        weights = {k: v.clone() for k, v in self.base_weights.items()}
        for message in downlinks.values():
            message.tensors.update(weights)
        return downlinks

    # -- aggregation ---------------------------------------------------------------------------
    def begin_fold(self, rnd: int) -> None:
        """FedIT's running sums of the trained tensors, and ``sum_k B_k A_k`` of the modules with both trained."""
        super().begin_fold(rnd)
        trained = set(self.trainable_keys())
        self._products = ProductSums([t for t in self.targets if t.a_key in trained and t.b_key in trained])

    def fold_reply(self, reply: Reply, parsed: None) -> None:
        """Add one accepted uplink with weight 1 (uniform mean, spec 7.2) and its products ``B_k A_k``."""
        self._sums.add(reply.message.tensors, 1.0)
        self._products.add(reply.message.tensors)

    def end_fold(self, rnd: int, report: RoundReport) -> None:
        """The new factors and head (uniform means), then each module's residual folded into its base weight."""
        products, self._products = self._products, None
        super().end_fold(rnd, report)
        norm = 0.0
        if products.count:
            for t in products.targets:
                delta = residual(products.mean(t), self.global_state[t.b_key], self.global_state[t.a_key],
                                 scaling=t.scaling)
                self.base_weights[t.weight] = fold_residual(self.base_weights[t.weight], delta,
                                                            transposed=t.transposed)
                norm += float(delta.pow(2).sum())
        report.metrics[RESIDUAL_NORM] = norm ** 0.5

    # -- reporting / persistence ---------------------------------------------------------------
    def global_adapter(self) -> dict[str, Tensor]:
        """The global adapter and the base weights with the residuals folded in (by parameter name), copies."""
        return {**super().global_adapter(), **{k: v.clone() for k, v in self.base_weights.items()}}

    def state_dict(self) -> dict[str, Any]:
        """FedIT's state (the adapter only under ``global``) and the base weights."""
        state = super().state_dict()
        state["global"] = {k: v.clone() for k, v in self.global_state.items()}
        state["base_weights"] = {k: v.clone() for k, v in self.base_weights.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if set(state["base_weights"]) != set(self.base_weights):
            raise ValueError("checkpoint base weights do not match this model's adapted modules")
        super().load_state_dict(state)
        for name, value in state["base_weights"].items():
            if value.shape != self.base_weights[name].shape:
                raise ValueError(f"checkpoint base weight '{name}' has shape {tuple(value.shape)}")
        self.base_weights = {k: state["base_weights"][k].clone() for k in self.base_weights}
