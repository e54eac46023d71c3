"""FedHFT's server: per-cluster cumulative updates, soft memberships, personalised downlinks.

State (spec §3): for every cluster j an independent dense cumulative update
``G_j^(m)`` per adapted module m and a head ``C_j``; the membership matrix
``π`` (clients × K, uniform at first); each client's resource level.

Per round (spec §4, with the released code's defects fixed, §10):

* downlink: ``SVD_r(Σ_j π_ij G_j)`` and ``Σ_j π_ij C_j`` (the dense mixture
  is built, factorised and freed module by module; clients with the same
  memberships share one factorisation);
* aggregation, streamed (a reply is folded in as it arrives, then dropped):
  module by module, the client's kept rows of ``ΔW_i = s B_i A_i`` are
  formed and folded into every cluster's float64 sum with weight
  ``ω_i π_ij``, so at most one client's (partial) dense update is alive;
  at the round's end ``G_j += Σ / n`` (count or soft normalisation). The
  running sums are K float64 copies of every module's ``d_out × d_in``
  update (twice the size of the float32 ``G``), plus K head sums. Per
  client the round keeps only its id, its weight and, in rounds that refit
  the memberships, its clustering features in the wire dtype: its head
  (``cluster_features: head``, the default: ``num_labels × (hidden + 1)``
  values, a few kB) or its LoRA factors with the kept
  ``B`` rows scattered to full size (``cluster_features: lora``: the size of
  a full-rank uplink per client, so O(clients) in those rounds);
* after round ``r > cluster_warmup_rounds`` (K > 1): a Gaussian mixture on
  the participants' uploaded heads (or LoRA factors, optionally PCA-reduced)
  gives their new memberships, aligned to the previous cluster numbering.

As a GMFL base (:mod:`fs_gmfl.core.gmfl.base`) a mask unit is one adapted
module: FedHFT merges ``B A`` into the backbone, masks rows of ``ΔW = s B A``
and re-factorises per-module cluster updates, so ``A``, ``B`` and the row
encoding of a module only mean something together. GMFL's statistic for a
module is the L1 change of its cumulative updates ``G_j`` summed over the
clusters; a frozen module is still sent in the personalised downlink, is not
trained or uploaded (no ``A``, ``B`` rows or row encoding) and its ``G_j``
keep their value. Heads are never units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fs_gmfl.core.fedhft import ops
from fs_gmfl.core.fedhft.config import FedHFTConfig
from fs_gmfl.core.fedhft.wire import AdapterLayout, ParsedUplink, downlink_message, parse_uplink
from fs_gmfl.core.gmfl.base import whole_units
from fs_gmfl.core.message import Message, Reply
from fs_gmfl.core.protocol import RoundReport
from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.core.uplinks import ReplyGate, ScreenedStrategy, UplinkPolicy, l2
from fs_gmfl.core.validation import DEFAULT_MAX_ABS

#: a client's personalised start: rank-r factors (``None`` before any aggregation) and head.
_Personal = tuple[dict[str, Tensor] | None, dict[str, Tensor]]


@dataclass
class _RoundSums:
    """The open round's running sums and the small per-client values the round's end needs.

    Per client only its id, its weight ``ω_i`` and, in rounds that refit the
    memberships, its clustering features (the head's, or the LoRA factors'
    values with ``feature_source: lora``; kept in the wire dtype).
    """

    modules: dict[str, list[Tensor]]
    denominators: dict[str, Tensor]
    heads: list[dict[str, Tensor]]
    keeps_features: bool
    client_ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    features: list[Tensor] = field(default_factory=list)


class FedHFTStrategy(ScreenedStrategy):
    """Mixture of masked adapters with clustered personalisation (Ilhan et al., CogMI 2025).

    Args:
        config: the ``fedhft`` configuration.
        initial: the initial adapter (LoRA factors give the shapes; the head is every cluster's first head).
        num_clients: number of clients N.
        scaling: the LoRA scaling ``alpha / r`` of the clients' adapters.
        seed: the run seed (levels, SVD, GMM and client initialisation seeds derive from it).
        max_abs: uploads with a larger absolute entry are rejected (``policy.max_abs``).

    Attributes:
        policy: the uplink bounds (:class:`~fs_gmfl.core.uplinks.UplinkPolicy`). The update a client asks for is
            ``ΔW_i = s B_i A_i`` on its kept rows, bounded relative to the largest cluster update of the module;
            its fresh ``A_i`` relative to the initial ``A``; its head's change relative to its personalised head.
    """

    name = "fedhft"

    def __init__(self, config: FedHFTConfig, initial: Mapping[str, Tensor], *, num_clients: int, scaling: float,
                 seed: int = 0, max_abs: float = DEFAULT_MAX_ABS) -> None:
        self.config = config
        self.layout = AdapterLayout.of(initial)
        self.upload_layout = self.layout  # the modules clients upload: all but those GMFL froze
        self.num_clients = num_clients
        self.scaling = float(scaling)
        self.seed = seed
        self.policy = UplinkPolicy(max_abs=max_abs)
        self.gate = ReplyGate()
        k = config.num_clusters
        self.cumulative: list[dict[str, Tensor]] = [
            {p.module: initial[p.a_key].new_zeros(self.layout.shapes[p.module][:2]) for p in self.layout.pairs}
            for _ in range(k)]
        self.heads: list[dict[str, Tensor]] = [{h: initial[h].detach().clone() for h in self.layout.head_keys}
                                               for _ in range(k)]
        self.memberships = torch.full((num_clients, k), 1.0 / k, dtype=torch.float64)
        self.levels = ops.assign_levels(num_clients, config.levels.client_share, seed=derive_seed(seed, "levels"))
        self.rounds_aggregated = 0
        self.last_metrics: dict[str, float] = {}
        self._sums: _RoundSums | None = None

    # -- GMFL base (fs_gmfl.core.gmfl.base) ----------------------------------------------------
    def mask_units(self) -> dict[str, tuple[str, ...]]:
        """One unit per adapted module: its ``A`` and ``B`` (and with them its row encoding)."""
        return {p.module: (p.a_key, p.b_key) for p in self.layout.pairs}

    def unit_values(self) -> dict[str, tuple[Tensor, ...]]:
        """Each module's cumulative update in every cluster (copies: aggregation adds in place)."""
        return {p.module: tuple(c[p.module].clone() for c in self.cumulative) for p in self.layout.pairs}

    def set_frozen(self, keys: frozenset[str]) -> None:
        """Modules whose ``A`` and ``B`` are in ``keys`` are no longer uploaded or folded into the clusters."""
        pairs = self.layout.pairs
        frozen = set(whole_units([(p.a_key, p.b_key) for p in pairs], keys, method="FedHFT"))
        self.upload_layout = dataclasses.replace(self.layout, pairs=tuple(p for i, p in enumerate(pairs)
                                                                          if i not in frozen))

    # -- personalised models -------------------------------------------------------------------
    def kept_rows(self, client_id: int) -> dict[str, int]:
        """Rows client ``client_id``'s level keeps, per module."""
        ratio = self.config.keep_ratios[self.levels[client_id]]
        return {m: ops.kept_row_count(ratio, shape[0]) for m, shape in self.layout.shapes.items()}

    def mixture_factors(self, weights: Sequence[float]) -> dict[str, Tensor]:
        """``SVD_r(Σ_j weights[j] G_j)`` for every module, as ``lora_B`` (``B̃``) and ``lora_A`` (``Ã``) keys."""
        out: dict[str, Tensor] = {}
        for index, pair in enumerate(self.layout.pairs):
            dense = ops.mixture([g[pair.module] for g in self.cumulative], weights)
            svd_seed = derive_seed(self.seed, "svd", self.rounds_aggregated, index)
            b, a = ops.low_rank_factors(dense, self.layout.rank, method=self.config.svd, seed=svd_seed,
                                        power_iters=self.config.svd_power_iters)
            dtype = self.layout.reference[pair.a_key].dtype
            out[pair.b_key], out[pair.a_key] = b.to(dtype), a.to(dtype)
        return out

    def mixture_head(self, weights: Sequence[float]) -> dict[str, Tensor]:
        """``Σ_j weights[j] C_j``."""
        return {key: ops.mixture([c[key] for c in self.heads], weights).to(self.heads[0][key].dtype)
                for key in self.layout.head_keys}

    def _personalised(self, weights: Tensor, cache: dict[bytes, _Personal]) -> _Personal:
        """Factors (None before any aggregation) and head of a membership row, cached by its exact value."""
        key = weights.numpy().tobytes()
        if key not in cache:
            w = weights.tolist()
            factors = self.mixture_factors(w) if self.rounds_aggregated else None
            cache[key] = (factors, self.mixture_head(w))
        return cache[key]

    def adapter_form(self, weights: Sequence[float] | Tensor) -> dict[str, Tensor]:
        """The personalised model of ``weights`` as adapter tensors: ``lora_A = Ã``, ``lora_B = B̃ / scaling``.

        Loaded into a model whose base weights are ``W0``, it computes
        ``W0 + B̃ Ã`` exactly as a client's merged start does.
        """
        w = torch.as_tensor(weights, dtype=torch.float64)
        factors = self.mixture_factors(w.tolist())
        for pair in self.layout.pairs:
            factors[pair.b_key] = factors[pair.b_key] / self.scaling
        return {**factors, **self.mixture_head(w.tolist())}

    # -- downlink ------------------------------------------------------------------------------
    def configure_round(self, rnd: int, clients: Sequence[int]) -> dict[int, Message]:
        """Each client's personalised factors and head, its level and its LoRA initialisation seed."""
        cache: dict[bytes, _Personal] = {}
        self.gate.open(rnd, clients)
        out = {}
        for cid in clients:
            factors, head = self._personalised(self.memberships[cid], cache)
            out[cid] = downlink_message(head, factors, level=self.levels[cid],
                                        seed=derive_seed(self.seed, "fedhft-client", rnd, cid))
        return out

    # -- aggregation (a streaming fold, client by client) ------------------------------------------
    def begin_fold(self, rnd: int) -> None:
        """Empty running sums: per module and cluster ``Σ ω_i π_ij M_i ⊙ ΔW_i`` and its row denominators."""
        k = self.config.num_clusters
        clusters = k > 1 and rnd > self.config.cluster_warmup_rounds
        shapes = {p.module: self.layout.shapes[p.module] for p in self.upload_layout.pairs}  # GMFL-frozen: none
        self._sums = _RoundSums(
            modules={m: [torch.zeros(shape[:2], dtype=torch.float64) for _ in range(k)] for m, shape in shapes.items()},
            denominators={m: torch.zeros(k, shape[0], dtype=torch.float64) for m, shape in shapes.items()},
            heads=[{h: torch.zeros(self.heads[0][h].shape, dtype=torch.float64) for h in self.layout.head_keys}
                   for _ in range(k)],
            keeps_features=clusters)

    @torch.no_grad()
    def fold_reply(self, reply: Reply, upload: ParsedUplink) -> None:
        """Add one client's masked update to every cluster's sums (one dense ``ΔW_i`` module at a time)."""
        sums = self._sums
        pi = self.memberships[reply.client_id]
        w = float(upload.num_samples) if self.config.client_weighting == "samples" else 1.0
        for pair in self.upload_layout.pairs:
            self._fold_module(sums, pair.module, upload.rows[pair.module],
                              upload.b_rows[pair.b_key], upload.a[pair.a_key], pi, w)
        for j, head in enumerate(sums.heads):
            coef = w * float(pi[j])
            for key in self.layout.head_keys:
                head[key] += coef * upload.head[key].to(torch.float64)
        sums.client_ids.append(reply.client_id)
        sums.weights.append(w)
        if sums.keeps_features:  # wire-dtype values, exactly what the float64 features hold, at half the size
            sums.features.append(self._features(upload).to(self.policy.wire_dtype))

    def _fold_module(self, sums: _RoundSums, module: str, rows: Tensor, b_rows: Tensor, a: Tensor, pi: Tensor,
                     w: float) -> None:
        """Fold one client's kept rows of one module into every cluster's sums (float64).

        ``Σ_i ω_i π_ij M_i ⊙ ΔW_i`` and its row denominators ``Σ_i ω_i M_i`` (count) or ``Σ_i ω_i π_ij M_i``
        (soft): the masked mixture average of spec §5.
        """
        kept_delta = self.scaling * (b_rows.to(torch.float64) @ a.to(torch.float64))  # the only dense part
        for j, cluster_sum in enumerate(sums.modules[module]):
            coef = w * float(pi[j])
            if coef:
                cluster_sum.index_add_(0, rows, kept_delta, alpha=coef)
            sums.denominators[module][j, rows] += coef if self.config.norm == "soft" else w

    @torch.no_grad()
    def end_fold(self, rnd: int, report: RoundReport) -> None:
        """Add each cluster's average to its cumulative update, replace the heads, then refit memberships."""
        sums, self._sums = self._sums, None
        if sums.client_ids:
            for module, cluster_sums in sums.modules.items():
                denominators = sums.denominators[module]
                denominators[denominators == 0] = 1.0
                for j, (cluster, total) in enumerate(zip(self.cumulative, cluster_sums)):
                    cluster[module] += (total / denominators[j, :, None]).to(cluster[module].dtype)
            self.heads = self._cluster_heads(sums)
            self.rounds_aggregated += 1
        report.metrics.update(self._recluster(rnd, sums.client_ids, sums.features))
        report.metrics.update(self.membership_metrics())

    def _cluster_heads(self, sums: _RoundSums) -> list[dict[str, Tensor]]:
        """Cluster heads from the running sums: ``C_j = Σ_i ω_i π_ij C_i / d_j``.

        ``d_j = Σ_i ω_i`` (count) or ``Σ_i ω_i π_ij`` (soft); a cluster with no membership mass keeps its head.
        """
        w = torch.tensor(sums.weights, dtype=torch.float64)
        pi = self.memberships[sums.client_ids]
        out = []
        for j, head_sum in enumerate(sums.heads):
            coef = w * pi[:, j]
            den = float(coef.sum() if self.config.norm == "soft" else w.sum())
            if den <= 0 or float(coef.sum()) <= 0:
                out.append({k: v.clone() for k, v in self.heads[j].items()})
                continue
            out.append({key: (head_sum[key] / den).to(self.heads[j][key].dtype) for key in self.heads[j]})
        return out

    def check_reply(self, reply: Reply) -> ParsedUplink | str:
        """The parsed upload, or why it is unacceptable (client id, format, then the update-norm bound)."""
        if not 0 <= reply.client_id < self.num_clients:
            return f"unknown client id {reply.client_id}"
        parsed = parse_uplink(reply.message, self.upload_layout, self.kept_rows(reply.client_id),
                              max_abs=self.policy.max_abs, wire_dtype=self.policy.wire_dtype)
        if isinstance(parsed, str):
            return parsed
        return self._check_update(reply.client_id, parsed) or parsed

    @torch.no_grad()
    def _check_update(self, client_id: int, upload: ParsedUplink) -> str | None:
        """The update-norm bound on ``ΔW_i`` per module, ``A_i`` and the head.

        ``‖BA‖² = tr(B (A Aᵀ) Bᵀ)``, so no dense product is formed.
        """
        policy = self.policy
        if policy.max_update_ratio <= 0:
            return None
        for pair in self.upload_layout.pairs:
            a = upload.a[pair.a_key].to(torch.float64)
            b = upload.b_rows[pair.b_key].to(torch.float64)
            delta = self.scaling * float(((b @ (a @ a.T)) * b).sum().clamp_min(0.0)) ** 0.5
            cluster_norm = max(l2(g[pair.module]) for g in self.cumulative)
            reason = (policy.check_update(pair.module, delta, cluster_norm, b.shape[0] * a.shape[1])
                      or policy.check_update(pair.a_key, l2(a), l2(self.layout.reference[pair.a_key]), a.numel()))
            if reason:
                return reason
        personal = self.mixture_head(self.memberships[client_id].tolist())
        return policy.check_deltas((k, upload.head[k], personal[k]) for k in self.layout.head_keys)

    # -- clustering ----------------------------------------------------------------------------
    def _recluster(self, rnd: int, ids: list[int], features: list[Tensor]) -> dict[str, float]:
        """Refit memberships of the participants ``ids`` (with their clustering ``features``) after warm-up."""
        cfg = self.config
        if cfg.num_clusters == 1 or rnd <= cfg.cluster_warmup_rounds:
            return {}
        if len(ids) < max(2, cfg.num_clusters):
            return {"clustering_skipped": 1.0}
        features = torch.stack(features).to(torch.float64)
        try:
            probs = ops.gmm_memberships(features, cfg.num_clusters, covariance=cfg.gmm_covariance,
                                        pca_dim=cfg.cluster_pca_dim if cfg.uses_pca else None,
                                        seed=derive_seed(self.seed, "gmm", rnd))
        except ValueError:
            return {"clustering_skipped": 1.0}
        if cfg.cluster_alignment == "overlap":
            probs = ops.align_memberships(probs, self.memberships[ids])
        self.memberships[ids] = probs
        return {"clustering_skipped": 0.0}

    def _features(self, upload: ParsedUplink) -> Tensor:
        """Clustering features of one upload: its head, or its LoRA factors (B rows scattered to full size)."""
        if self.config.feature_source == "head":
            return torch.cat([upload.head[k].flatten().to(torch.float64) for k in self.layout.head_keys])
        parts = []
        for pair in self.upload_layout.pairs:
            d_out, _, r = self.layout.shapes[pair.module]
            b = torch.zeros(d_out, r, dtype=torch.float64)
            b[upload.rows[pair.module]] = upload.b_rows[pair.b_key].to(torch.float64)
            parts += [upload.a[pair.a_key].flatten().to(torch.float64), b.flatten()]
        return torch.cat(parts)

    def membership_metrics(self) -> dict[str, float]:
        """Mass of each cluster (sum of memberships / N) and the mean largest membership."""
        mass = self.memberships.sum(dim=0) / self.num_clients
        out = {f"cluster_mass_{j}": float(m) for j, m in enumerate(mass)}
        out["membership_max_mean"] = float(self.memberships.max(dim=1).values.mean())
        return out

    # -- evaluation ----------------------------------------------------------------------------
    def global_adapter(self) -> dict[str, Tensor]:
        """The global model: the mixture with uniform memberships, in adapter form."""
        k = self.config.num_clusters
        return self.adapter_form([1.0 / k] * k)

    def evaluation_adapters(self) -> dict[str, dict[str, Tensor]]:
        """``client:<id>`` personalised models (``eval`` personalised/both) and ``cluster:<j>`` models (both)."""
        out: dict[str, dict[str, Tensor]] = {}
        if self.config.eval in ("personalised", "both"):
            cache: dict[bytes, dict[str, Tensor]] = {}
            for cid in range(self.num_clients):
                key = self.memberships[cid].numpy().tobytes()
                if key not in cache:
                    cache[key] = self.adapter_form(self.memberships[cid])
                out[f"client:{cid}"] = cache[key]
        if self.config.eval == "both":
            for j in range(self.config.num_clusters):
                out[f"cluster:{j}"] = self.adapter_form(torch.eye(self.config.num_clusters, dtype=torch.float64)[j])
        return out

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Cluster updates and heads, memberships, levels and the aggregation counter.

        Every random choice (SVD, mixture fit, client seeds) derives from the
        run seed and the round, so no generator state is needed to resume.
        """
        return {
            "cumulative": [{m: g.clone() for m, g in c.items()} for c in self.cumulative],
            "heads": [{k: v.clone() for k, v in h.items()} for h in self.heads],
            "memberships": self.memberships.clone(),
            "levels": list(self.levels),
            "rounds_aggregated": self.rounds_aggregated,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same adapter layout, clients and clusters)."""
        k = self.config.num_clusters
        if len(state["cumulative"]) != k or tuple(state["memberships"].shape) != (self.num_clients, k):
            raise ValueError(f"checkpoint has {len(state['cumulative'])} clusters and memberships of shape "
                             f"{tuple(state['memberships'].shape)}; expected {k} and {(self.num_clients, k)}")
        for cluster in state["cumulative"]:
            for module, shape in self.layout.shapes.items():
                if tuple(cluster[module].shape) != shape[:2]:
                    raise ValueError(f"checkpoint update of '{module}' has shape {tuple(cluster[module].shape)}")
        self.cumulative = [{m: c[m].clone() for m in self.layout.shapes} for c in state["cumulative"]]
        self.heads = [{key: h[key].clone() for key in self.layout.head_keys} for h in state["heads"]]
        self.memberships = state["memberships"].to(torch.float64).clone()
        self.levels = [int(x) for x in state["levels"]]
        self.rounds_aggregated = int(state["rounds_aggregated"])
