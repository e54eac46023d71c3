"""Client side of FedHFT: personalised start, fresh LoRA, masked upload.

Per round (spec §4): merge the received personalised factors into the
backbone (``W_i = W0 + B̃_i Ã_i``), load the mixed head, re-initialise the
LoRA (A as peft does, B = 0, seeded by the server's seed), train, then
upload ``A``, the ``k = max(1, round(s·d_out))`` rows of ``B`` with the
highest score, their row encoding and the head. The dense ``ΔW = s B A`` is
never formed: row energies use ``A Aᵀ`` (``r × r``).

The host's model is shared by every client, so :meth:`FedHFTClient.finish`
restores what :meth:`FedHFTClient.prepare` changed (backbone weights, swapped
``premask`` modules, gradient hooks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fs_gmfl.core.adapter import adapter_parameters, adapter_state, load_adapter_tensors
from fs_gmfl.core.fedhft.layers import RowSubsetLinear
from fs_gmfl.core.fedhft.ops import kept_row_count, row_energies, top_rows
from fs_gmfl.core.fedhft.wire import LEVEL, SEED, AdapterLayout, uplink_message
from fs_gmfl.core.gmfl.base import whole_units
from fs_gmfl.core.message import Message
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, TrainStats
from fs_gmfl.errors import InputError

ADAPTER = "default"
SESSION = "fedhft_session"


@dataclass
class _Session:
    """What :meth:`FedHFTClient.prepare` changed on the shared model, undone by :meth:`restore`.

    ``layout`` lists the modules this client trains and uploads (all but GMFL's frozen ones).
    """

    layout: AdapterLayout
    keep: dict[str, int]
    scaling: dict[str, float]
    saved_weights: dict[str, Tensor] = field(default_factory=dict)
    swapped: dict[str, nn.Module] = field(default_factory=dict)
    hooks: list[RemovableHandle] = field(default_factory=list)
    fisher: dict[str, Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Remove hooks, put the original ``lora_B`` modules back and restore the backbone weights."""
        for handle in self.hooks:
            handle.remove()
        for module, original in self.swapped.items():
            model.get_submodule(module).lora_B[ADAPTER] = original
        for module, weight in self.saved_weights.items():
            model.get_submodule(module).base_layer.weight.copy_(weight)
        self.hooks, self.swapped, self.saved_weights = [], {}, {}


class FedHFTClient(ClientAlgorithm):
    """FedHFT's client algorithm.

    Args:
        keep_ratios: kept-row fraction of each resource level (the downlink names the level).
        mask_score: ``"row_energy"`` or ``"fisher"``.
        premask: fix the rows before training and train only those (see :mod:`.layers`).
        init_lora_weights: ``"default"`` (A Kaiming-uniform as peft) or ``"gaussian"`` (A ~ N(0, 1/r)).
    """

    def __init__(self, keep_ratios: Sequence[float], *, mask_score: str = "row_energy", premask: bool = False,
                 init_lora_weights: str = "default") -> None:
        if premask and mask_score == "fisher":
            raise ValueError("premask fixes the rows before training; it cannot use the Fisher score")
        self.keep_ratios = list(keep_ratios)
        self.mask_score = mask_score
        self.premask = premask
        self.init_lora_weights = init_lora_weights

    # -- prepare -------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """Merge the personalised start, load the head, re-initialise the LoRA; list what to train."""
        return self.prepare_excluding(model, message, client_state, frozenset())

    def prepare_excluding(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any],
                          frozen: frozenset[str]) -> LocalPlan:
        """:meth:`prepare` without the modules whose ``A`` and ``B`` are in ``frozen`` (GMFL base interface).

        A frozen module still gets its personalised start merged and a fresh
        LoRA with ``B = 0``; untrained, that LoRA adds nothing, and the uplink
        leaves out its ``A``, ``B`` rows and row encoding.
        """
        layout = AdapterLayout.of(adapter_state(model))
        keep_ratio = self._keep_ratio(message)
        factors = self._check_downlink(message, layout)
        gen = torch.Generator().manual_seed(int(message.control[SEED]))
        frozen_modules = set(whole_units([(p.a_key, p.b_key) for p in layout.pairs], frozen, method="FedHFT"))
        trained = dataclasses.replace(layout, pairs=tuple(p for i, p in enumerate(layout.pairs)
                                                          if i not in frozen_modules))
        session = _Session(trained, {p.module: kept_row_count(keep_ratio, layout.shapes[p.module][0])
                                    for p in layout.pairs},
                           {p.module: float(model.get_submodule(p.module).scaling[ADAPTER]) for p in layout.pairs})
        try:
            self._start_from(model, message, factors, layout, session, gen)
        except Exception:
            session.restore(model)
            raise
        params = adapter_parameters(model)
        if self.mask_score == "fisher":
            self._track_fisher(params, session)
        trainable = [k for p in trained.pairs for k in (p.a_key, p.b_key)] + list(layout.head_keys)
        return LocalPlan(model=model, trainable={k: params[k] for k in trainable}, info={SESSION: session})

    def _keep_ratio(self, message: Message) -> float:
        if LEVEL not in message.control or SEED not in message.control:
            raise InputError("FedHFT downlink lacks the client's level or seed")
        level = int(message.control[LEVEL])
        if not 0 <= level < len(self.keep_ratios):
            raise InputError(f"FedHFT downlink names level {level}; this client knows {len(self.keep_ratios)}")
        return self.keep_ratios[level]

    @staticmethod
    def _check_downlink(message: Message, layout: AdapterLayout) -> bool:
        """True if the downlink carries personalised factors; raise if it is incomplete."""
        lora = {k for p in layout.pairs for k in (p.a_key, p.b_key)}
        missing_heads = [k for k in layout.head_keys if k not in message.tensors]
        present = lora & set(message.tensors)
        extra = set(message.tensors) - lora - set(layout.head_keys)
        if missing_heads or extra or present not in (set(), lora):
            raise InputError(f"FedHFT downlink is incomplete or has foreign tensors (missing heads "
                             f"{missing_heads[:2]}, {len(present)} of {len(lora)} LoRA factors, extra {sorted(extra)[:2]})")
        return bool(present)

    @torch.no_grad()
    def _start_from(self, model: nn.Module, message: Message, factors: bool, layout: AdapterLayout,
                    session: _Session, gen: torch.Generator) -> None:
        load_adapter_tensors(model, {k: message.tensors[k] for k in layout.head_keys})
        for pair in layout.pairs:
            layer = model.get_submodule(pair.module)
            b_start = message.tensors[pair.b_key] if factors else None
            a_start = message.tensors[pair.a_key] if factors else None
            if factors:
                weight = layer.base_layer.weight
                session.saved_weights[pair.module] = weight.detach().clone()
                delta = (b_start.to(torch.float32) @ a_start.to(torch.float32)).to(weight.dtype)
                weight.add_(delta.T if getattr(layer, "fan_in_fan_out", False) else delta)
            self._fresh_lora(layer, gen)
            if self.premask:
                self._restrict_rows(layer, pair.module, a_start, b_start, session, gen)

    def _fresh_lora(self, layer: nn.Module, gen: torch.Generator) -> None:
        """peft's initialisation, seeded: A Kaiming-uniform (a = sqrt 5) or N(0, 1/r); B = 0."""
        a = layer.lora_A[ADAPTER].weight
        if self.init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1.0 / a.shape[0], generator=gen)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        nn.init.zeros_(layer.lora_B[ADAPTER].weight)

    @staticmethod
    def _restrict_rows(layer: nn.Module, module: str, a_start: Tensor | None, b_start: Tensor | None,
                       session: _Session, gen: torch.Generator) -> None:
        """premask: keep the top-energy rows of the personalised adapter (random at cold start)."""
        original = layer.lora_B[ADAPTER]
        d_out, rank = original.weight.shape
        scores = row_energies(a_start, b_start) if a_start is not None else torch.zeros(d_out)
        rows = top_rows(scores, session.keep[module], generator=gen)
        session.swapped[module] = original
        layer.lora_B[ADAPTER] = RowSubsetLinear(rows, d_out, rank, dtype=original.weight.dtype,
                                                device=original.weight.device)

    @staticmethod
    def _track_fisher(params: dict[str, nn.Parameter], session: _Session) -> None:
        """Accumulate the squared gradient of every ``lora_B`` row over local training."""
        for pair in session.layout.pairs:
            d_out = session.layout.shapes[pair.module][0]
            total = session.fisher.setdefault(pair.module, torch.zeros(d_out, dtype=torch.float64))

            def hook(grad: Tensor, total: Tensor = total) -> None:
                total.add_(grad.detach().to(torch.float64).pow(2).sum(dim=1).cpu())

            session.hooks.append(params[pair.b_key].register_hook(hook))

    # -- finish --------------------------------------------------------------------------------
    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """Select the kept rows, build the uplink, restore the shared model."""
        session: _Session = plan.info[SESSION]
        try:
            return self._uplink(plan.model, session, stats.num_samples)
        finally:
            session.restore(plan.model)

    def _uplink(self, model: nn.Module, session: _Session, num_samples: int) -> Message:
        layout = session.layout
        params = adapter_parameters(model)
        a, b_rows, rows = {}, {}, {}
        for pair in layout.pairs:
            b_module = model.get_submodule(pair.module).lora_B[ADAPTER]
            a[pair.a_key] = params[pair.a_key].detach().clone()
            b_full = b_module.dense_weight() if isinstance(b_module, RowSubsetLinear) else params[pair.b_key].detach()
            rows[pair.module] = self._kept_rows(pair.module, a[pair.a_key], b_full, b_module, session)
            b_rows[pair.b_key] = b_full[rows[pair.module]].clone()
        head = {k: params[k].detach().clone() for k in layout.head_keys}
        return uplink_message(layout, a, b_rows, rows, head, num_samples)

    def _kept_rows(self, module: str, a: Tensor, b: Tensor, b_module: nn.Module, session: _Session) -> Tensor:
        k, d_out = session.keep[module], b.shape[0]
        if isinstance(b_module, RowSubsetLinear):
            return b_module.rows.detach().cpu().clone()
        if k == d_out:
            return torch.arange(d_out)
        if self.mask_score == "fisher":
            return top_rows(session.fisher[module], k)
        return top_rows(row_energies(a, b, scaling=session.scaling[module]), k)
