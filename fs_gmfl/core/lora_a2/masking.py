"""GMFL over LoRA-A2 (spec GMFL.md section 7.4, the authors' ``lora_a2gm``): every round re-masks the factor it trained.

After a round that trained ``lora_A`` the server ranks the ``lora_A`` tensors by the L1 norm of the global update it
just applied, ``u = ||Delta||_1`` (spec section 4), and keeps the smallest fraction ``rho_A`` of them frozen in the
next ``lora_A`` round; after a round that trained ``lora_B`` the same with ``rho_B`` for the ``lora_B`` tensors.
Selection is spec section 5's (``tau = s[floor(rho * n)]``, ``u < tau`` frozen; ``rho`` is the fraction *frozen*).

* ``rho_A = c + floor((r + 1) / 20) * beta`` in the code's 0-based round ``r``; with this package's 1-based round
  ``t = r + 1`` that is ``c + floor(t / gmfl.period) * gmfl.beta`` (the period is the code's hard-coded 20, as in
  plain GMFL), capped by ``gmfl.max_ratio``. It is plain GMFL's ratio ``c + k * beta`` with ``k = t // period``,
  taken after every ``lora_A`` round instead of after rounds ``period, 2 * period, ...``: ``c`` already applies
  before round ``period``.
* ``rho_B = gmfl.a2_ratio_B`` (the code's fixed 0.8, inferred as a key), capped by ``gmfl.max_ratio``.
* A re-mask *replaces* that factor's mask ("re-masks every round", spec section 4's ``M <- freeze_smallest(u, rho)``):
  a tensor frozen in the round has ``Delta = 0`` and is chosen again whenever the ``floor(rho * n) + 1``-th smallest
  ``u`` is positive, so in practice the frozen set only grows (``rho_A`` never falls, ``rho_B`` is fixed); only when
  trained tensors did not move at all can a tensor come back.
* A round without any accepted update re-masks nothing (inferred: the code has no rejected rounds; a zero update
  would otherwise clear the mask).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fs_gmfl.core.adapter import LORA_A, LORA_B, kind_of
from fs_gmfl.core.gmfl import ops
from fs_gmfl.core.gmfl.base import UnitValue
from fs_gmfl.core.gmfl.config import GMFLConfig
from fs_gmfl.core.gmfl.strategy import GlobalMasking
from fs_gmfl.core.lora_a2.ops import trained_factor


def remask_ratio(rnd: int, config: GMFLConfig) -> float:
    """The fraction of round ``rnd``'s trained factor frozen by the re-mask after it (spec 7.4).

    ``lora_A`` rounds: ``min(c + (rnd // period) * beta, max_ratio)``; ``lora_B`` rounds:
    ``min(a2_ratio_B, max_ratio)``.
    """
    if trained_factor(rnd) == LORA_A:
        ratio = config.c + (rnd // config.period) * config.beta
    else:
        ratio = config.a2_ratio_B
    return min(ratio, config.max_ratio)


class AlternatingMasking(GlobalMasking):
    """GMFL's mask over LoRA-A2's mask units (one LoRA tensor each), re-masked after every round (spec 7.4).

    Same interface as :class:`~fs_gmfl.core.gmfl.strategy.GlobalMasking` (the wrapper cannot tell them apart):
    ``frozen`` holds the frozen units of both factors; ``refreshes`` counts re-masks; :attr:`ratio` is the ratio of
    the mask the next round trains under.

    Args:
        config: the ``gmfl`` configuration (``stat`` must be ``last_round_l1``; checked by the lora_a2 spec).
        candidate_keys: the ``lora_A`` and ``lora_B`` keys, in canonical order.
        seed: seed of the ``random`` selection ablation.
    """

    def __init__(self, config: GMFLConfig, candidate_keys: Sequence[str], *, seed: int = 0) -> None:
        super().__init__(config, candidate_keys, seed=seed)
        self.factor_keys = {factor: [k for k in self.candidate_keys if kind_of(k) == factor]
                            for factor in (LORA_A, LORA_B)}
        self.ratios = {LORA_A: 0.0, LORA_B: 0.0}  # the ratio of each factor's current mask
        self.last_round = 0

    @property
    def ratio(self) -> float:
        """The freeze ratio of the factor the next round trains (0 before its first re-mask)."""
        return self.ratios[trained_factor(self.last_round + 1)]

    def observe(self, rnd: int, old: Mapping[str, UnitValue] | None, new: Mapping[str, UnitValue] | None) -> bool:
        """Re-mask the factor round ``rnd`` trained from the update just applied; ``None``: no accepted update.

        Returns:
            True if the factor was re-masked.
        """
        self.last_round = rnd
        if old is None or new is None:
            return False
        factor = trained_factor(rnd)
        keys = self.factor_keys[factor]
        magnitudes = ops.unit_update_l1(new, old, keys, normalize=self.config.normalize)
        self.statistic.update(magnitudes)
        self.ratios[factor] = remask_ratio(rnd, self.config)
        self._remask(keys, magnitudes, self.ratios[factor])
        return True

    def _remask(self, keys: Sequence[str], magnitudes: Mapping[str, float], ratio: float) -> None:
        """Replace the mask of ``keys`` (one factor) by the selection of spec section 5 at ``ratio``."""
        self.refreshes += 1
        self.last_magnitudes = dict(magnitudes)
        if self.config.selection == "random":  # the ablation: random tensors, growing to floor(ratio * n)
            chosen = ops.select_frozen_random(keys, self.frozen & set(keys), ratio, generator=self._generator)
        else:
            chosen = ops.select_frozen(magnitudes, ratio, tie_policy=self.config.tie_policy)
        new_frozen = (self.frozen - set(keys)) | chosen
        if new_frozen != self.frozen:
            self.version += 1
        self.frozen = new_frozen

    def state_dict(self) -> dict[str, Any]:
        """:class:`GlobalMasking`'s state, each factor's ratio and the last observed round."""
        return {**super().state_dict(), "ratios": dict(self.ratios), "last_round": self.last_round}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.ratios = {factor: float(state["ratios"][factor]) for factor in (LORA_A, LORA_B)}
        self.last_round = int(state["last_round"])
