"""The ``flora:`` YAML section: client rank profiles (HAFL's, reused) and the scaling of a rank-r_k client.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations" (NeurIPS 2024, arXiv 2409.05976); the
aggregation rule is spec GMFL.md section 7.5.
"""

from __future__ import annotations

from dataclasses import dataclass

from fs_gmfl.config.fields import _PATH_ATTR, build, fail, opt, to_dict
from fs_gmfl.core.hafl.config import ClientProfile, HAFLConfig

SCALINGS = ("global_constant", "peft_per_rank")
DOWNLINKS = ("dense", "stacked")


@dataclass
class FLoRAConfig:
    """FLoRA: each round, clients train fresh LoRA modules of their own rank; the server stacks them and merges.

    Rank profiles are HAFL's (``hafl.profiles`` with ``rank``): a profile
    names its clients by ``share`` or ``clients`` and gives them rank
    ``r_k <= r = llm.adapter.args[0].r``; clients without a profile train rank
    ``r``.
    """

    profiles: list[ClientProfile] = opt(
        factory=list, help="Client rank profiles, e.g. [{share: 0.5, rank: 2}, {share: 0.5, rank: 8}] (HAFL's "
        "profiles, 'rank' only); empty: every client trains rank r = llm.adapter.args[0].r.")
    scaling: str = opt("global_constant", "LoRA scaling of a rank-r_k client: 'global_constant' (lora_alpha * r_k "
                       "/ r, so every client scales by alpha/r and the merge is (alpha/r) B_stack A_stack as in spec "
                       "7.5) or 'peft_per_rank' (lora_alpha, so client k scales by alpha/r_k and the merge is "
                       "sum_k p_k (alpha/r_k) B_k A_k).", choices=SCALINGS, inferred=True)

    downlink: str = opt("dense", "What rebuilds the merged base weights on a client: 'dense' (the accumulated merged "
                        "update, d_out x d_in per module, every round; clients keep nothing) or 'stacked' (clients "
                        "keep their merged update; a downlink carries the stacked factors of the rounds merged since "
                        "the client's last round, or the dense update when that is smaller).", choices=DOWNLINKS,
                        inferred=True)

    def __post_init__(self) -> None:
        for profile in self.profiles:
            if profile.rank is None or profile.freeze_ratio is not None:
                fail(profile, "rank", profile.rank, "a rank in every FLoRA profile (and no freeze_ratio)")
        self.rank_profiles()

    def rank_profiles(self) -> HAFLConfig:
        """The profiles as HAFL's truncation profiles (HAFL's checks and seeded assignment apply to them)."""
        prefix = getattr(self, _PATH_ATTR, "flora.")
        return build(HAFLConfig, {"scheme": "truncation", "profiles": to_dict(self.profiles)}, prefix=prefix)

    def check_run(self, *, rank: int, client_num: int) -> None:
        """Ranks within ``rank`` and client ids within the clients; shares summing to 1 (HAFL's rules).

        Raises:
            ConfigError: naming the offending ``flora.profiles[i].*`` key.
        """
        self.rank_profiles().check_run(r_max=rank, client_num=client_num)

    def client_alpha(self, alpha: float, client_rank: int, rank: int) -> float:
        """``lora_alpha`` of a rank-``client_rank`` client: ``alpha * r_k / r`` (global_constant) or ``alpha``."""
        return alpha * client_rank / rank if self.scaling == "global_constant" else alpha
