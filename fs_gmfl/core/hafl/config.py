"""Configuration of HAFL (the ``hafl:`` YAML subtree) and its client resource profiles.

Su, Yan, Deng, "Federated LLMs Fine-tuned with Adaptive Importance-Aware
LoRA" (HAFL, arXiv 2411.06581, ICC 2025). Defaults follow the paper's
Table I where it gives them; every other default is a reconstruction
flagged ``inferred`` (see ``../shared/specs/HAFL.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from fs_gmfl.config.fields import fail, opt

SCHEMES = ("truncation", "freezing")
AGGREGATIONS = ("adaptive", "zero_padding", "fedavg")
SCORE_REDUCTIONS = ("sum", "mean")
SCALINGS = ("global_constant", "peft_per_rank")
NORM_SCOPES = ("uploaded", "full", "rank1")
NORM_GRANULARITIES = ("module", "model")
WEIGHTINGS = ("norm", "datasize", "uniform")
#: tolerance on the sum of profile shares.
SHARE_TOLERANCE = 1e-6


@dataclass
class ClientProfile:
    """One client resource profile: which clients, and how many rank-1 components they train.

    A profile names its clients by ``share`` (a fraction of the clients not
    named explicitly by another profile) or by explicit ``clients`` ids, and
    its capacity by ``rank`` (truncation scheme: the client trains a rank-r_k
    LoRA) or ``freeze_ratio`` (freezing scheme: the client keeps rank r_max and
    freezes that fraction of the components).
    """

    share: Optional[float] = opt(None, "Fraction of the clients in this profile (shares of all share-profiles sum "
                                 "to 1); give either share or clients.", gt=0.0, le=1.0)
    clients: list[int] = opt(factory=list, help="Explicit client ids (0-based) of this profile, instead of a share.",
                             ge=0)
    rank: Optional[int] = opt(None, "Truncation scheme: the client's LoRA rank r_k in [1, r_max].", ge=1)
    freeze_ratio: Optional[float] = opt(None, "Freezing scheme: fraction rho_k of the r_max components the client "
                                        "keeps frozen, in [0, 1].", ge=0.0, le=1.0)
    name: str = opt("", "Label in reports (default: r<rank> or rho<freeze_ratio>).")

    def label(self) -> str:
        """The profile's name in reports."""
        if self.name:
            return self.name
        return f"r{self.rank}" if self.rank is not None else f"rho{self.freeze_ratio:g}"


@dataclass
class HAFLConfig:
    """HAFL: importance-aware rank-1 truncation (ITALoRA) or freezing (IFALoRA) with rank-1 aggregation.

    The global LoRA has rank r_max = ``llm.adapter.args[0].r``. After every
    round the server scores each rank-1 component b_i a_i with a smoothed
    sensitivity (eqs. 4-8) and broadcasts the scores; each client trains its
    top-n_k components; the server aggregates each component over the clients
    that trained it (adaptive), with zeros for the others (zero_padding), or by
    plain FedAvg when every client trains every component (HomLoRA).
    """

    scheme: str = opt("freezing", "'truncation' (ITALoRA: a client receives and trains a rank-r_k LoRA of its top "
                      "components) or 'freezing' (IFALoRA: a client keeps rank r_max and trains only its top "
                      "components).", choices=SCHEMES)
    aggregation: str = opt("adaptive", "'adaptive' (per component, over the clients that trained it), "
                           "'zero_padding' (IFZLoRA / HetLoRA: untrained components count as zeros) or 'fedavg' "
                           "(HomLoRA: sample-weighted FedAvg; every client must train every component).",
                           choices=AGGREGATIONS)
    profiles: list[ClientProfile] = opt(
        factory=list, help="Client resource profiles, e.g. [{share: 0.33, rank: 2}, {share: 0.33, rank: 4}, "
        "{share: 0.34, rank: 16}]; empty: every client trains all r_max components.")
    beta1: float = opt(0.85, "EMA factor of the smoothed sensitivity (eq. 5; paper Table I).", gt=0.0, lt=1.0)
    beta2: float = opt(0.85, "EMA factor of the uncertainty (eq. 6; paper Table I).", gt=0.0, lt=1.0)
    score_reduce: str = opt("sum", "Component score from element scores (eq. 8): 'sum' over b_i and a_i (paper) "
                            "or 'mean' (AdaLoRA: mean over b_i + mean over a_i).", choices=SCORE_REDUCTIONS,
                            inferred=True)
    scaling: str = opt("global_constant", "LoRA scaling of a rank-r_k client: 'global_constant' (alpha*r_k/r_max, "
                       "so every client scales by alpha/r_max like the global model) or 'peft_per_rank' "
                       "(alpha/r_k).", choices=SCALINGS, inferred=True)
    norm_scope: str = opt("uploaded", "Frobenius 'sparsity' norm of a client (eq. 14): of the product of its "
                          "uploaded components, of its 'full' local LoRA (frozen components included), or per "
                          "'rank1' component ||b_i||*||a_i||.", choices=NORM_SCOPES, inferred=True)
    norm_granularity: str = opt("module", "One norm per client and adapted module, or per client for the whole "
                                "'model' (sum over modules).", choices=NORM_GRANULARITIES, inferred=True)
    weighting: str = opt("norm", "Client weights of adaptive / zero_padding aggregation: the Frobenius 'norm' "
                         "(paper), the sample count ('datasize') or 'uniform'.", choices=WEIGHTINGS, inferred=True)
    n_min: int = opt(1, "Freezing scheme: fewest components a client trains (n_k = clip(round((1-rho)*r_max), "
                     "n_min, r_max)); 0 lets rho=1 clients train nothing.", ge=0, inferred=True)
    train_head: bool = opt(False, "Train and FedAvg the task head (its bytes are then counted); default: the head "
                           "stays at its seeded initial value and is never sent.", inferred=True)
    eval_truncated_ranks: bool = opt(False, "Also evaluate the global model truncated to each profile's number of "
                                     "components (rank_<n>/test_acc; the paper's degradation figure).")

    def __post_init__(self) -> None:
        if self.aggregation == "zero_padding" and self.norm_scope == "rank1":
            fail(self, "norm_scope", self.norm_scope, "'uploaded' or 'full' with aggregation 'zero_padding' "
                 "(zero-padding normalises one weight per client over all participants)")
        for profile in self.profiles:
            self._check_profile_form(profile)

    def _check_profile_form(self, profile: ClientProfile) -> None:
        if (profile.share is None) == (not profile.clients):
            fail(profile, "share", profile.share, "exactly one of share or clients per profile")
        if self.scheme == "truncation" and (profile.rank is None or profile.freeze_ratio is not None):
            fail(profile, "rank", profile.rank, "a rank (and no freeze_ratio) in every profile of scheme "
                 "'truncation'")
        if self.scheme == "freezing" and (profile.freeze_ratio is None or profile.rank is not None):
            fail(profile, "freeze_ratio", profile.freeze_ratio, "a freeze_ratio (and no rank) in every profile of "
                 "scheme 'freezing'")
        if len(set(profile.clients)) != len(profile.clients):
            fail(profile, "clients", profile.clients, "distinct client ids")

    def check_run(self, *, r_max: int, client_num: int) -> None:
        """Cross-section rules: ranks within r_max, ids within the clients, shares summing to 1, fedavg at full rank.

        Raises:
            ConfigError: naming the offending ``hafl.profiles[i].*`` key.
        """
        named: set[int] = set()
        for profile in self.profiles:
            if profile.rank is not None and profile.rank > r_max:
                fail(profile, "rank", profile.rank, f"an integer in [1, r_max] with r_max = llm.adapter.args[0].r "
                     f"= {r_max}")
            outside = [c for c in profile.clients if c >= client_num]
            if outside:
                fail(profile, "clients", profile.clients, f"ids in [0, {client_num - 1}] (federate.client_num = "
                     f"{client_num})")
            if named & set(profile.clients):
                fail(profile, "clients", profile.clients, f"ids not already in another profile (repeated: "
                     f"{sorted(named & set(profile.clients))})")
            named |= set(profile.clients)
        self._check_shares(named, client_num)
        if self.aggregation == "fedavg":
            partial = [p.label() for p in self.profiles if self.trained_components(p, r_max) != r_max]
            if partial:
                fail(self, "aggregation", "fedavg", f"'adaptive' or 'zero_padding' when a profile trains fewer than "
                     f"r_max = {r_max} components ({', '.join(partial)}); fedavg is HomLoRA, where every client "
                     "trains every component")

    def homogeneity_warning(self, r_max: int) -> str | None:
        """Why the run is not heterogeneous, when no profile is given (``None`` for HomLoRA, chosen on purpose).

        Without profiles every client trains all ``r_max`` components: one
        full-rank profile, so the run is homogeneous LoRA (FedIT's training
        with HAFL's aggregation), which is easy to mistake for HAFL proper.
        """
        if self.profiles or self.aggregation == "fedavg":
            return None
        example = (f"[{{share: 0.5, rank: {max(1, r_max // 2)}}}, {{share: 0.5, rank: {r_max}}}]"
                   if self.scheme == "truncation" else "[{share: 0.5, freeze_ratio: 0.5}, {share: 0.5, "
                   "freeze_ratio: 0.0}]")
        return (f"hafl.profiles is empty: every client trains all r_max = {r_max} rank-1 components (one full-rank "
                f"profile, i.e. homogeneous LoRA as in FedIT); for clients of different capacity set hafl.profiles, "
                f"e.g. {example}")

    def _check_shares(self, named: set[int], client_num: int) -> None:
        shared = [p for p in self.profiles if p.share is not None]
        if shared:
            total = sum(p.share for p in shared)
            if abs(total - 1.0) > SHARE_TOLERANCE:
                fail(shared[-1], "share", shared[-1].share, f"shares summing to 1 over all profiles (they sum to "
                     f"{total:.6g})")
        elif self.profiles and len(named) != client_num:
            missing = sorted(set(range(client_num)) - named)
            fail(self, "profiles", f"<{len(self.profiles)} profiles>", f"every client in a profile when no profile "
                 f"has a share (clients without a profile: {missing[:8]}{'...' if len(missing) > 8 else ''})")

    def trained_components(self, profile: ClientProfile | None, r_max: int) -> int:
        """n_k: components a client of ``profile`` trains (all r_max without a profile).

        Truncation: ``r_k``. Freezing: ``clip(round((1 - rho_k) * r_max), n_min, r_max)``
        with halves rounded up.
        """
        if profile is None:
            return r_max
        if self.scheme == "truncation":
            assert profile.rank is not None
            return min(profile.rank, r_max)
        assert profile.freeze_ratio is not None
        n = math.floor((1.0 - profile.freeze_ratio) * r_max + 0.5 + 1e-9)
        return min(r_max, max(self.n_min, n))
