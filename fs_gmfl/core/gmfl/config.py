"""Configuration of GMFL global masking (the ``gmfl:`` YAML subtree)."""

from __future__ import annotations

from dataclasses import dataclass

from fs_gmfl.config.fields import fail, opt

STATISTICS = ("last_round_l1", "period_sum_l1", "ema_l1")
NORMALISATIONS = ("none", "relative")
TIE_POLICIES = ("strict", "exact_k")
SELECTIONS = ("magnitude", "random")
DOWNLINK_MODES = ("stateless", "stateful_sync")


@dataclass
class GMFLConfig:
    """GMFL: server-side, periodically refreshed, growing LoRA-tensor freezing masks.

    Huang et al., "GMFL: Efficient Global Masking for Federated LLM
    Fine-tuning", ACL 2026. Every ``period`` rounds the server ranks the LoRA
    tensors by the L1 magnitude of the global update and freezes the smallest
    fraction ``min(c + k * beta, max_ratio)`` of them (k = refresh index).
    """

    use: bool = opt(False, "Wrap the base method (federate.method: fedit/fedavg, ffa_lora, lora_a2, hafl or fedhft) "
                    "in GMFL masking; the mask unit is one LoRA tensor (fedit, lora_a2; ffa_lora: lora_B only) or "
                    "one adapted module, A and B together (hafl, fedhft).")
    c: float = opt(0.1, "Initial freeze ratio c (paper/code default 0.1).", ge=0.0, le=1.0)
    beta: float = opt(0.05, "Freeze-ratio increment per refresh (code: beta/tau, default 0.05).", ge=0.0, le=1.0)
    period: int = opt(20, "Refresh period T in rounds; masks are recomputed after rounds T, 2T, ...", ge=1)
    max_ratio: float = opt(
        0.95, "Upper clamp of the freeze ratio; 1.0 allows freezing every LoRA tensor (clients then train "
        "only the head).", ge=0.0, le=1.0, inferred=True)
    tie_policy: str = opt(
        "strict", "'strict' (reference): freeze tensors strictly below the floor(ratio*n)-th smallest magnitude, "
        "so ties stay trainable; 'exact_k': freeze exactly floor(ratio*n), ties broken by tensor order.",
        choices=TIE_POLICIES, inferred=True)
    stat: str = opt(
        "last_round_l1", "Update statistic: L1 norm of the refresh round's global update (reference), its sum "
        "over the period, or an EMA over rounds.", choices=STATISTICS, inferred=True)
    ema_decay: float = opt(0.9, "Decay of the 'ema_l1' statistic.", gt=0.0, lt=1.0, inferred=True)
    normalize: str = opt(
        "none", "'relative' divides each tensor's L1 update by the L1 norm of its previous global value.",
        choices=NORMALISATIONS, inferred=True)
    selection: str = opt(
        "magnitude", "'random' freezes randomly chosen tensors on the same schedule (ablation baseline).",
        choices=SELECTIONS, inferred=True)
    downlink: str = opt(
        "stateless", "'stateless': the full adapter is sent to every sampled client (reference); "
        "'stateful_sync' (fedit, ffa_lora only): clients cache the adapter and receive trainable tensors plus "
        "frozen tensors that changed since their last sync.", choices=DOWNLINK_MODES, inferred=True)
    a2_ratio_B: float = opt(
        0.8, "lora_a2 only: fraction of the lora_B tensors frozen by the re-mask after each round that trained "
        "lora_B (spec 7.4: the authors' code fixes 0.8, which looks experiment-specific); capped by gmfl.max_ratio.",
        ge=0.0, le=1.0, inferred=True)

    def idle_warning(self, total_rounds: int) -> str | None:
        """Why masking never starts in a run of ``total_rounds`` rounds, if it does not (``None`` otherwise).

        The first mask is computed after round ``period`` and used from the
        next round on, so a run of at most ``period`` rounds freezes nothing.
        """
        if not self.use or self.period < total_rounds:
            return None
        hint = f", e.g. {total_rounds // 2}" if total_rounds >= 2 else " (in a run of at least 2 rounds)"
        return (f"gmfl.period {self.period} is not below federate.total_round_num {total_rounds}: the first mask is "
                f"computed after round {self.period}, so no LoRA tensor is frozen in this run (it trains as its base "
                f"method); set gmfl.period below federate.total_round_num{hint}")

    def __post_init__(self) -> None:
        if self.use and self.c > self.max_ratio:
            fail(self, "c", self.c, f"at most gmfl.max_ratio ({self.max_ratio})")
