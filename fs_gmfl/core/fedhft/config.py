"""Configuration of FedHFT (the ``fedhft:`` YAML subtree, used with ``federate.method: fedhft``).

The LoRA rank, alpha, dropout and target modules come from
``llm.adapter.args[0]``; the authors' defaults are ``r = lora_alpha = 32``,
dropout 0.1, ``target_modules: [query, value]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fs_gmfl.config.fields import fail, opt

CLUSTER_FEATURES = ("head", "head_pca", "lora", "lora_pca")
MASK_SCORES = ("row_energy", "fisher")
NORMALISATIONS = ("count", "soft")
EVAL_MODES = ("personalised", "global", "both")
SVD_METHODS = ("randomized", "exact")
COVARIANCES = ("full", "diag", "tied", "spherical")
CLIENT_WEIGHTINGS = ("uniform", "samples")
ALIGNMENTS = ("overlap", "none")
#: tolerance on the sum of ``levels.client_share``.
SHARE_TOLERANCE = 1e-6


@dataclass
class FedHFTLevels:
    """Resource levels: the fraction of adapter rows each level uploads, and the share of clients per level."""

    keep_ratio: list[float] = opt(
        factory=lambda: [0.5], help="Kept-row fraction s of each level (code: --vertical_scale_ratios); a "
        "level-s client uploads max(1, round(s * d_out)) rows of every lora_B.", gt=0.0, le=1.0)
    client_share: list[float] = opt(
        factory=lambda: [1.0], help="Share of clients at each level (code: --client_split_ratios); same length "
        "as keep_ratio, sums to 1. Levels are assigned once by a seeded permutation, counts by largest "
        "remainder so every client gets a level.", ge=0.0, le=1.0)

    def __post_init__(self) -> None:
        if not self.keep_ratio:
            fail(self, "keep_ratio", self.keep_ratio, "a non-empty list of numbers in (0, 1]")
        if len(self.client_share) != len(self.keep_ratio):
            fail(self, "client_share", self.client_share,
                 f"one share per level ({len(self.keep_ratio)} entries, like keep_ratio)")
        if not math.isclose(sum(self.client_share), 1.0, abs_tol=SHARE_TOLERANCE):
            fail(self, "client_share", self.client_share, "shares summing to 1")


@dataclass
class FedHFTConfig:
    """FedHFT: mixture of masked adapters with soft client clustering.

    Ilhan et al., "FedHFT: Efficient Federated Finetuning with Heterogeneous
    Edge Clients", IEEE CogMI 2025 (arXiv 2510.14054). Clients fine-tune a
    fresh LoRA on a personalised start and upload only the highest-energy
    rows of ``lora_B``; the server keeps one cumulative dense update per
    cluster, soft memberships from a Gaussian mixture over client heads, and
    sends each client the rank-r SVD of its membership-weighted mixture.
    """

    levels: FedHFTLevels = opt(factory=FedHFTLevels, help="Resource levels.")
    num_clusters: int = opt(1, "Number of clusters K (code default 1).", ge=1)
    cluster_warmup_rounds: int = opt(
        5, "Rounds before memberships are first estimated; memberships are refit after every round r > this "
        "value (code: --num_warmup_rounds).", ge=0)
    cluster_features: str = opt(
        "head", "Features of the Gaussian mixture: the uploaded head ('head', code), all uploaded LoRA factors "
        "('lora', code fallback without a head), or either reduced by PCA ('head_pca', 'lora_pca').",
        choices=CLUSTER_FEATURES)
    cluster_pca_dim: int = opt(
        8, "Components of the PCA reduction for *_pca features (capped at participants - 1).", ge=1,
        inferred=True)
    gmm_covariance: str = opt("full", "Covariance type of sklearn's GaussianMixture (code: full).",
                              choices=COVARIANCES)
    cluster_alignment: str = opt(
        "overlap", "A refitted mixture numbers its components arbitrarily; 'overlap' permutes them to best "
        "match the previous memberships of the same clients (Hungarian assignment), 'none' keeps sklearn's "
        "order (code).", choices=ALIGNMENTS, inferred=True)
    mask_score: str = opt(
        "row_energy", "Row importance: squared L2 norm of each row of the update (code), or the Fisher score "
        "(sum of squared lora_B gradients over local training).", choices=MASK_SCORES)
    norm: str = opt(
        "count", "Denominator of the masked, membership-weighted average: the number of clients that sent the "
        "row ('count', code; with K > 1 a cluster's update then shrinks with its membership mass, to 1/K under "
        "uniform memberships), or their summed membership ('soft', a weighted mean). Heads are divided by the "
        "number of participants (count) or their summed membership (soft).", choices=NORMALISATIONS)
    client_weighting: str = opt(
        "uniform", "Weight of each client in the averages: 'uniform' (code) or its sample count.",
        choices=CLIENT_WEIGHTINGS)
    premask: bool = opt(
        False, "Fix each client's kept rows before training (top row energies of its personalised adapter; "
        "seeded random rows at cold start) and train only those rows of lora_B, so its gradient and optimizer "
        "state shrink with the keep ratio.", inferred=True)
    svd: str = opt(
        "randomized", "Rank-r factorisation of the mixture: seeded randomized SVD (code: torch.svd_lowrank, "
        "q = r) or exact SVD.", choices=SVD_METHODS)
    svd_power_iters: int = opt(2, "Power iterations of the randomized SVD (torch.svd_lowrank default 2).", ge=0)
    eval: str = opt(
        "personalised", "'personalised': each client's personalised model on its local validation shard "
        "(needs data.client_val_fraction > 0); 'global': only the global model (uniform memberships) on the "
        "server's splits; 'both': personalised plus every cluster's model on the server's splits.",
        choices=EVAL_MODES)

    def __post_init__(self) -> None:
        if self.premask and self.mask_score == "fisher":
            fail(self, "premask", True, "False with mask_score 'fisher' (the Fisher score needs every row's "
                 "gradient; premask fixes the rows before training)")

    @property
    def keep_ratios(self) -> list[float]:
        """Kept-row fraction of each level."""
        return list(self.levels.keep_ratio)

    @property
    def uses_pca(self) -> bool:
        """Whether cluster features are PCA-reduced."""
        return self.cluster_features.endswith("_pca")

    @property
    def feature_source(self) -> str:
        """``head`` or ``lora``."""
        return self.cluster_features.split("_")[0]
