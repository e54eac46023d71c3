"""HAFL's server-side importance tracker: smoothed sensitivity and uncertainty per LoRA element.

After each aggregation the server feeds the old and new global factors to
:meth:`ImportanceTracker.observe` (spec eqs. 4-7; the formulas of peft's
AdaLoRA ``RankAllocator`` with ``grad := -delta / lr``) and reads one score
per rank-1 component and module from :meth:`ImportanceTracker.scores`
(eq. 8). The scores of round t select the components of round t + 1.
State is kept in float32 (fp16 would underflow: scores scale with lr^-2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fs_gmfl.core.adapter import LoraPair
from fs_gmfl.core.hafl import ops

EXP_AVG_IPT = "exp_avg_ipt"
EXP_AVG_UNC = "exp_avg_unc"


def update_importance(state: Mapping[str, Mapping[str, Tensor]], old: Mapping[str, Tensor],
                      new: Mapping[str, Tensor], keys: Sequence[str], *, lr: float, beta1: float,
                      beta2: float) -> dict[str, dict[str, Tensor]]:
    """Functional twin of :meth:`ImportanceTracker.observe`: the state after one global update.

    Args:
        state: per key ``{"exp_avg_ipt", "exp_avg_unc"}``; a missing key starts at zeros.
        old, new: global tensors before and after the update.
        keys: the LoRA keys to track.

    Returns:
        A new state mapping (inputs untouched).
    """
    out: dict[str, dict[str, Tensor]] = {}
    for key in keys:
        theta_new, theta_old = new[key].float(), old[key].float()
        previous = state.get(key)
        ipt_bar = previous[EXP_AVG_IPT] if previous else torch.zeros_like(theta_new)
        unc_bar = previous[EXP_AVG_UNC] if previous else torch.zeros_like(theta_new)
        ipt = ops.sensitivity(theta_new, theta_old, lr=lr)
        ipt_bar, unc_bar = ops.smooth_importance(ipt, ipt_bar, unc_bar, beta1=beta1, beta2=beta2)
        out[key] = {EXP_AVG_IPT: ipt_bar, EXP_AVG_UNC: unc_bar}
    return out


class ImportanceTracker:
    """Per-element EMA sensitivity and uncertainty of every LoRA factor, and per-component scores.

    Args:
        pairs: the adapted modules (A and B keys), in canonical order.
        rank: r_max, the number of components per module.
        lr: the clients' learning rate eta of eq. (4).
        beta1, beta2: EMA factors of eqs. (5)-(6).
        reduce: ``"sum"`` or ``"mean"`` (eq. 8).
    """

    def __init__(self, pairs: Sequence[LoraPair], rank: int, *, lr: float, beta1: float, beta2: float,
                 reduce: str = "sum") -> None:
        self.pairs = list(pairs)
        self.rank = rank
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.reduce = reduce
        self.keys = [k for p in self.pairs for k in (p.a_key, p.b_key)]
        self.state: dict[str, dict[str, Tensor]] = {}
        self.updates = 0

    def observe(self, old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> None:
        """Fold one global update ``old -> new`` into the EMAs."""
        self.state = update_importance(self.state, old, new, self.keys, lr=self.lr, beta1=self.beta1,
                                       beta2=self.beta2)
        self.updates += 1

    def element_scores(self, key: str) -> Tensor | None:
        """Eq. (7) for every element of ``key`` (``None`` before the first update)."""
        st = self.state.get(key)
        return ops.element_score(st[EXP_AVG_IPT], st[EXP_AVG_UNC]) if st else None

    def scores(self) -> Tensor:
        """Component scores, one row per module in ``pairs`` order (``modules x r_max``, float32; zeros at first)."""
        out = torch.zeros(len(self.pairs), self.rank, dtype=torch.float32)
        for row, pair in enumerate(self.pairs):
            score_a, score_b = self.element_scores(pair.a_key), self.element_scores(pair.b_key)
            if score_a is not None and score_b is not None:
                out[row] = ops.component_scores(score_a, score_b, reduce=self.reduce)
        return out

    def state_dict(self) -> dict[str, Any]:
        """EMA tensors by key and the update count."""
        return {"state": {k: {n: t.clone() for n, t in v.items()} for k, v in self.state.items()},
                "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        unknown = set(state["state"]) - set(self.keys)
        if unknown:
            raise ValueError(f"importance state has keys of another model, e.g. {sorted(unknown)[:1]}")
        self.state = {k: {n: t.clone() for n, t in v.items()} for k, v in state["state"].items()}
        self.updates = int(state["updates"])
