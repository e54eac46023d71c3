"""GMFL's server-side state: the mask and its periodic refresh.

:class:`GlobalMasking` is host-agnostic. It ranks *mask units* (named; a unit
is one LoRA tensor for FedIT / FFA-LoRA, one adapted module for HAFL and
FedHFT, see :mod:`fs_gmfl.core.gmfl.base`). The wrapper
(:class:`~fs_gmfl.core.gmfl.wrapper.GMFLStrategy`) calls
:meth:`GlobalMasking.observe` after each aggregation with the old and new
global values of every unit; every ``period`` rounds it recomputes the mask
(Huang et al., GMFL, ACL 2026; reference ``fed/GMFL.py``). Freezing is
monotone: a frozen unit stays frozen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fs_gmfl.core.gmfl import ops
from fs_gmfl.core.gmfl.base import UnitValue
from fs_gmfl.core.gmfl.config import GMFLConfig


class GlobalMasking:
    """Unit-level freezing masks refreshed from global update magnitudes.

    Args:
        config: the ``gmfl`` configuration.
        candidate_keys: the names of the mask units, in canonical order (for
            FedIT every LoRA tensor key, for FFA-LoRA the ``lora_B`` keys, for
            HAFL and FedHFT the adapted modules). Heads are never candidates.
        seed: seed of the generator used by the ``random`` selection ablation.
    """

    def __init__(self, config: GMFLConfig, candidate_keys: Sequence[str], *, seed: int = 0) -> None:
        if not candidate_keys:
            raise ValueError("GMFL needs at least one LoRA tensor to mask")
        self.config = config
        self.candidate_keys = list(candidate_keys)
        self.frozen: set[str] = set()
        self.refreshes = 0
        self.version = 0  # increments whenever the mask changes
        self.statistic: dict[str, float] = {k: 0.0 for k in self.candidate_keys}
        self.last_magnitudes: dict[str, float] = {}
        self._generator = torch.Generator().manual_seed(seed)

    # -- queries -------------------------------------------------------------------------------
    def trainable_flags(self) -> list[bool]:
        """One flag per candidate key (True = trainable), the order of the wire mask."""
        return [k not in self.frozen for k in self.candidate_keys]

    @property
    def frozen_fraction(self) -> float:
        """Fraction of candidate tensors frozen."""
        return len(self.frozen) / len(self.candidate_keys)

    @property
    def ratio(self) -> float:
        """The freeze ratio of the current mask."""
        c = self.config
        return ops.freeze_ratio(self.refreshes, c=c.c, beta=c.beta, max_ratio=c.max_ratio)

    # -- updates -------------------------------------------------------------------------------
    def observe(self, rnd: int, old: Mapping[str, UnitValue] | None, new: Mapping[str, UnitValue] | None) -> bool:
        """Record round ``rnd``'s global update; refresh the mask after rounds ``period, 2*period, ...``.

        Args:
            rnd: the round just aggregated (1-based).
            old, new: global values of every unit before and after (a tensor
                per unit, or a sequence of tensors whose L1 changes are
                summed; :func:`~fs_gmfl.core.gmfl.ops.unit_update_l1`); ``None`` for a round
                without any accepted update, which adds nothing to the
                statistic (a refresh then uses the statistic gathered so far).

        Returns:
            True if the mask was refreshed in this call.
        """
        if old is not None and new is not None:
            self._accumulate(ops.unit_update_l1(new, old, self.candidate_keys, normalize=self.config.normalize))
        if rnd % self.config.period != 0:
            return False
        self._refresh()
        return True

    def _accumulate(self, u: Mapping[str, float]) -> None:
        stat = self.config.stat
        for key, value in u.items():
            if stat == "last_round_l1":
                self.statistic[key] = value
            elif stat == "period_sum_l1":
                self.statistic[key] += value
            else:
                d = self.config.ema_decay
                self.statistic[key] = d * self.statistic[key] + (1 - d) * value

    def _refresh(self) -> None:
        self.refreshes += 1
        magnitudes = {k: (0.0 if k in self.frozen else v) for k, v in self.statistic.items()}
        self.last_magnitudes = dict(magnitudes)
        if self.config.selection == "random":
            chosen = ops.select_frozen_random(self.candidate_keys, self.frozen, self.ratio, generator=self._generator)
        else:
            chosen = ops.select_frozen(magnitudes, self.ratio, tie_policy=self.config.tie_policy)
        new_frozen = self.frozen | chosen
        if new_frozen != self.frozen:
            self.version += 1
        self.frozen = new_frozen
        if self.config.stat == "period_sum_l1":
            self.statistic = {k: 0.0 for k in self.candidate_keys}

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Serializable state: mask (as per-key flags), refresh counter, statistic and RNG."""
        return {
            "frozen_flags": [k in self.frozen for k in self.candidate_keys],
            "refreshes": self.refreshes,
            "version": self.version,
            "statistic": [self.statistic[k] for k in self.candidate_keys],
            "rng": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same candidate keys)."""
        flags = list(state["frozen_flags"])
        if len(flags) != len(self.candidate_keys):
            raise ValueError(f"mask has {len(flags)} entries, expected {len(self.candidate_keys)}")
        self.frozen = {k for k, f in zip(self.candidate_keys, flags) if f}
        self.refreshes = int(state["refreshes"])
        self.version = int(state["version"])
        self.statistic = dict(zip(self.candidate_keys, (float(x) for x in state["statistic"])))
        self._generator.set_state(state["rng"])
