"""FedHFT as a registered method: builder, configuration rules and host rules in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fs_gmfl.core.fedhft.client import FedHFTClient
from fs_gmfl.core.fedhft.config import FedHFTConfig
from fs_gmfl.core.fedhft.strategy import FedHFTStrategy
from fs_gmfl.core.fedhft.estimate import estimate_fedhft
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec
from fs_gmfl.errors import ConfigError

if TYPE_CHECKING:
    from fs_gmfl.config.schema import RunConfig

#: largest full-covariance mixture fitted without PCA: K x D^2 float64 entries (about 2 GiB).
FEDHFT_MAX_COVARIANCE_ENTRIES = 2**28


def check_fedhft_features(cfg: RunConfig, strategy: FedHFTStrategy) -> None:
    """Reject clustering features the model cannot provide or the mixture cannot hold.

    Raises:
        ConfigError: head features without a trained head, or unreduced
            features too large for a full-covariance mixture.
    """
    hft = cfg.fedhft
    if hft.num_clusters == 1:
        return
    layout = strategy.layout
    if hft.feature_source == "head" and not layout.head_keys:
        raise ConfigError("fedhft.cluster_features", hft.cluster_features, "'lora' or 'lora_pca': this model "
                          "has no trained head to cluster on")
    dim = sum(layout.reference[k].numel() for k in layout.head_keys) if hft.feature_source == "head" else \
        sum(d_out * r + r * d_in for d_out, d_in, r in layout.shapes.values())
    if not hft.uses_pca and hft.gmm_covariance in ("full", "tied") and \
            hft.num_clusters * dim * dim > FEDHFT_MAX_COVARIANCE_ENTRIES:
        raise ConfigError("fedhft.cluster_features", hft.cluster_features,
                          f"'{hft.feature_source}_pca' or fedhft.gmm_covariance 'diag': {dim}-dimensional features "
                          f"need {hft.num_clusters} covariance matrices of {dim}x{dim}")


def build_fedhft(ctx: MethodContext) -> Method:
    """FedHFT: per-cluster cumulative updates on the server, masked fresh LoRA on clients."""
    cfg = ctx.cfg
    hft = cfg.fedhft
    strategy = FedHFTStrategy(hft, ctx.initial, num_clients=cfg.federate.client_num,
                              scaling=cfg.lora.lora_alpha / cfg.lora.r, seed=cfg.seed)
    check_fedhft_features(cfg, strategy)
    client = FedHFTClient(hft.keep_ratios, mask_score=hft.mask_score, premask=hft.premask,
                          init_lora_weights=cfg.lora.init_lora_weights)
    info = {"levels": list(strategy.levels), "keep_ratios": hft.keep_ratios, "num_clusters": hft.num_clusters}
    return Method(strategy, client, info)


def check_run(cfg: RunConfig) -> None:
    """Personalised evaluation needs local validation shards; clusters need enough clients per round."""
    hft = cfg.fedhft
    if hft.eval != "global" and cfg.data.client_val_fraction <= 0:
        raise ConfigError("fedhft.eval", hft.eval, "'global' unless data.client_val_fraction > 0 (personalised "
                          "evaluation uses each client's local validation shard)")
    if hft.num_clusters > cfg.federate.clients_per_round():
        raise ConfigError("fedhft.num_clusters", hft.num_clusters, f"at most the clients per round "
                          f"({cfg.federate.clients_per_round()}); memberships could never be fitted")


def check_fs_run(lookup: Callable[[str], Any]) -> None:
    """Under FederatedScope only the global model is evaluated."""
    fedhft_eval = lookup("fedhft.eval")
    if fedhft_eval not in ("global", None):
        raise ConfigError("fedhft.eval", fedhft_eval, "'global' under FederatedScope: personalised evaluation on "
                          "the clients' local shards runs in the embedded simulator only")


FEDHFT = MethodSpec(
    name="fedhft", build=build_fedhft, config_section="fedhft", config_class=FedHFTConfig, check_config=check_run,
    gmfl_base=True,
    summary="clustered, resource-masked LoRA with per-cluster cumulative updates (FedHFT)",
    estimate=estimate_fedhft,
    host_defaults={"fedhft.eval": "global"}, check_host_config=check_fs_run,
    example_overrides=("federate.method", "fedhft", "fedhft.eval", "global"))
SPECS = [FEDHFT]
