"""HAFL client: select the top components from the broadcast scores, train them, upload them with their indices.

* Truncation (ITALoRA, spec section 6): the client trains a real rank-n_k
  LoRA, obtained from the host's ``model_provider(r=n_k, lora_alpha=...)``
  (same frozen backbone, another peft adapter), into which the received
  components are copied in score order.
* Freezing (IFALoRA / IFZLoRA, spec section 7): the client keeps rank r_max;
  gradient masks zero the frozen rows of ``A`` / columns of ``B`` and the host
  restores the frozen entries after every optimiser step, so they stay
  bit-identical whatever the optimiser's weight decay does (the Adam/AdamW
  decay trap of spec section 7).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from fs_gmfl.core.adapter import HEAD, LoraPair, adapter_parameters, kind_of, load_adapter_tensors, lora_pairs
from fs_gmfl.core.gmfl.base import whole_units
from fs_gmfl.core.hafl import ops
from fs_gmfl.core.hafl.wire import N_TRAIN, SCORES, build_uplink
from fs_gmfl.core.message import Message
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, TrainStats
from fs_gmfl.errors import InputError

DEFAULT_ADAPTER = "default"


def component_masks(shape_a: torch.Size, shape_b: torch.Size, selected: Tensor,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """0/1 gradient masks that leave rows ``selected`` of ``A`` and columns ``selected`` of ``B`` trainable."""
    keep = torch.zeros(shape_a[0], dtype=dtype)
    keep[selected.to(torch.long)] = 1
    return keep[:, None].expand(shape_a).clone(), keep[None, :].expand(shape_b).clone()


def client_alpha(alpha: float, n: int, rank: int, scaling: str) -> float:
    """``lora_alpha`` of a rank-n client: ``alpha * n / r_max`` (global_constant) or ``alpha`` (peft_per_rank)."""
    return alpha * n / rank if scaling == "global_constant" else alpha


class HAFLClient(ClientAlgorithm):
    """Client side of HAFL.

    Args:
        scheme: ``"truncation"`` or ``"freezing"``.
        rank: r_max.
        alpha: the global ``lora_alpha``.
        scaling: ``"global_constant"`` or ``"peft_per_rank"`` (truncation only).
        train_head: the head is received, trained and uploaded.
        model_provider: host callback ``provider(r=..., lora_alpha=...)`` returning
            the model with a LoRA of that rank active on the same backbone;
            ``provider()`` re-activates the default adapter. Needed by the
            truncation scheme for clients with n_k < r_max.
    """

    def __init__(self, scheme: str, *, rank: int, alpha: float, scaling: str = "global_constant",
                 train_head: bool = False, model_provider: Callable[..., nn.Module] | None = None) -> None:
        self.scheme = scheme
        self.rank = rank
        self.alpha = alpha
        self.scaling = scaling
        self.train_head = train_head
        self.model_provider = model_provider

    # -- prepare -----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """Select the top-n_k components, load them (truncated model or full model) and list what to train."""
        return self.prepare_excluding(model, message, client_state, frozenset())

    def prepare_excluding(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any],
                          frozen: frozenset[str]) -> LocalPlan:
        """:meth:`prepare` without the modules whose ``A`` and ``B`` are in ``frozen`` (GMFL base interface):
        they stay in the model, untrained, and the uplink leaves out their factors and index rows."""
        all_pairs = lora_pairs(adapter_parameters(model))
        n = self._trained_count(message, all_pairs)
        frozen_rows = set(whole_units([(p.a_key, p.b_key) for p in all_pairs], frozen, method="HAFL"))
        active = [row for row in range(len(all_pairs)) if row not in frozen_rows]
        pairs = [all_pairs[row] for row in active]
        selected = self._select(message, all_pairs, n)[active]
        model, adapter = self._local_model(model, n)
        params = adapter_parameters(model, adapter)
        load_adapter_tensors(model, message.tensors, adapter)
        lora_keys = [k for p in pairs for k in (p.a_key, p.b_key)] if n else []
        head_keys = [k for k in params if kind_of(k) == HEAD] if self.train_head else []
        trainable = {k: params[k] for k in lora_keys + head_keys}
        for key, p in params.items():
            p.requires_grad_(key in trainable)
        plan = LocalPlan(model=model, trainable=trainable, info={"selected": selected, "adapter": adapter,
                                                                 "pairs": pairs})
        if self.scheme == "freezing" and 0 < n < self.rank:
            self._freeze_unselected(plan, pairs, selected)
        return plan

    def _trained_count(self, message: Message, pairs: list[LoraPair]) -> int:
        missing = [k for p in pairs for k in (p.a_key, p.b_key) if k not in message.tensors]
        if missing:
            raise InputError(f"downlink lacks {len(missing)} LoRA tensors, e.g. '{missing[0]}'")
        if self.scheme == "truncation":
            return int(message.tensors[pairs[0].a_key].shape[0])
        if N_TRAIN not in message.control:
            raise InputError("freezing downlink lacks 'n_train'")
        return int(message.control[N_TRAIN])

    def _select(self, message: Message, pairs: list[LoraPair], n: int) -> Tensor:
        scores = message.control.get(SCORES)
        if scores is None or tuple(scores.shape) != (len(pairs), self.rank):
            raise InputError(f"downlink scores must have shape ({len(pairs)}, {self.rank})")
        if not 0 <= n <= self.rank:
            raise InputError(f"cannot train {n} of {self.rank} components")
        if n == 0:
            return torch.zeros(len(pairs), 0, dtype=torch.long)
        return torch.stack([ops.top_components(row, n) for row in scores])

    def _local_model(self, model: nn.Module, n: int) -> tuple[nn.Module, str]:
        """The model to train and its adapter name: a rank-n adapter for truncated clients."""
        if self.scheme != "truncation":
            return model, DEFAULT_ADAPTER
        alpha = client_alpha(self.alpha, n, self.rank, self.scaling)
        if n == self.rank and alpha == self.alpha:
            return model, DEFAULT_ADAPTER
        if self.model_provider is None:
            raise InputError("the truncation scheme needs a host that builds rank-r_k models (model_provider)")
        local = self.model_provider(r=n, lora_alpha=alpha)
        return local, str(getattr(local, "active_adapter", DEFAULT_ADAPTER))

    @staticmethod
    def _freeze_unselected(plan: LocalPlan, pairs: list[LoraPair], selected: Tensor) -> None:
        for pair, chosen in zip(pairs, selected):
            a, b = plan.trainable[pair.a_key], plan.trainable[pair.b_key]
            mask_a, mask_b = component_masks(a.shape, b.shape, chosen, a.dtype)
            plan.grad_masks[pair.a_key], plan.grad_masks[pair.b_key] = mask_a, mask_b
            plan.frozen_values[pair.a_key] = a.detach().clone()
            plan.frozen_values[pair.b_key] = b.detach().clone()

    # -- finish ------------------------------------------------------------------------------
    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """Upload the trained components (score order), their global indices and the sample count."""
        factors = {k: p.detach() for k, p in plan.trainable.items()}
        if plan.info["adapter"] != DEFAULT_ADAPTER and self.model_provider is not None:
            self.model_provider()  # the host's model is shared: re-activate its default adapter
        return build_uplink(factors, plan.info["pairs"], plan.info["selected"], rank=self.rank,
                            num_samples=stats.num_samples, truncated=self.scheme == "truncation")
