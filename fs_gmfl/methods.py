"""Method registry: ``federate.method`` (plus wrappers such as ``gmfl.use``) -> strategy and client.

Both hosts build methods through :func:`build_method`, so a method added here
runs in the embedded simulator and under FederatedScope alike. Registration
is explicit and refuses to overwrite an existing name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.adapter import HEAD, kind_of, load_model_tensors
from fs_gmfl.core.fedavg import LoraClient, LoraFedAvg, mask_candidate_keys
from fs_gmfl.core.fedavg.client import processed_samples_cap
from fs_gmfl.core.fedhft import FedHFTClient, FedHFTStrategy
from fs_gmfl.core.fedkrso import FedKRSOClient, FedKRSOServer
from fs_gmfl.core.fft import FullWeightClient
from fs_gmfl.core.gmfl import GlobalMasking
from fs_gmfl.core.hafl import HAFLClient, HAFLStrategy, client_capacities, profile_report
from fs_gmfl.core.protocol import ClientAlgorithm, Strategy
from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.core.targets import disable_lora_branches, resolve_targets, target_weights
from fs_gmfl.core.uplinks import UplinkPolicy
from fs_gmfl.errors import ConfigError, InputError


@dataclass
class MethodContext:
    """What a method builder receives from the host.

    Attributes:
        cfg: the run configuration.
        initial: the initial global adapter (LoRA factors and head) by key.
        model_provider: host callback returning a model for adapter overrides
            (e.g. ``{"r": 4}``); ``None`` if the host has one fixed model.
            ``provider(r=4, lora_alpha=2.0)`` returns the model with a LoRA of
            that shape active on the same frozen backbone (its peft
            ``active_adapter`` names it; non-LoRA adapter tensors such as the
            head start as copies of the default adapter's); ``provider()``
            re-activates the default adapter.
        model: the host's model, for methods that train backbone weights
            (their initial values and shapes come from it); builders may
            switch off adapter branches their method does not use, and change
            nothing else. ``None`` if the host does not provide it.
    """

    cfg: RunConfig
    initial: dict[str, Tensor]
    model_provider: Callable[..., nn.Module] | None = None
    model: nn.Module | None = None


@dataclass
class Method:
    """A built method: server strategy, client algorithm and facts to report.

    Attributes:
        load_global: set by methods that train backbone weights: puts the
            global trained tensors (targeted weights and head) into a host
            model, e.g. the server's model that the host evaluates and
            checkpoints, and tells the client algorithm that the model holds
            them. ``None`` for adapter methods (hosts load the adapter).
        clients_reset: set by methods whose server tracks what each client's
            model holds: called by a host whose clients restart from the
            initial model while the server resumes, so the next downlinks
            bring them from there.
    """

    strategy: Strategy
    client: ClientAlgorithm
    info: dict[str, Any] = field(default_factory=dict)
    load_global: Callable[[nn.Module], None] | None = None
    clients_reset: Callable[[], None] | None = None

    @property
    def trains_backbone(self) -> bool:
        """True for methods that train backbone weights (FedKRSO, FFT)."""
        return self.load_global is not None


Builder = Callable[[MethodContext], Method]
_BUILDERS: dict[str, Builder] = {}


def register_method(name: str, builder: Builder) -> None:
    """Register ``builder`` under ``name``; registering the same builder again is a no-op.

    Raises:
        KeyError: ``name`` is already registered to a different builder.
    """
    existing = _BUILDERS.get(name)
    if existing is not None and existing is not builder:
        raise KeyError(f"method '{name}' is already registered to {existing.__module__}.{existing.__qualname__}")
    _BUILDERS[name] = builder


def registered_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_BUILDERS)


def build_method(ctx: MethodContext) -> Method:
    """Build the method selected by ``ctx.cfg``."""
    name = ctx.cfg.method
    if name not in _BUILDERS:
        raise KeyError(f"no method registered as '{name}' (known: {registered_methods()})")
    method = _BUILDERS[name](ctx)
    configure_uplinks(method.strategy, ctx.cfg)
    return method


def configure_uplinks(strategy: Strategy, cfg: RunConfig) -> None:
    """Set the strategy's uplink bounds from ``federate.*`` (hosts add shard sizes they know).

    A strategy without an :class:`~fs_gmfl.core.uplinks.UplinkPolicy` (a plug-in's own) is left alone.
    """
    policy = getattr(strategy, "policy", None)
    if not isinstance(policy, UplinkPolicy):
        return
    fed = cfg.federate
    policy.max_samples = fed.max_sample_count
    policy.max_update_ratio = fed.max_update_ratio
    policy.update_rms_floor = fed.update_rms_floor
    policy.wire_dtype = uplink_dtype(cfg)


def uplink_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype clients train and upload floating tensors in: ``train.half_dtype`` under is_enable_half, else fp32
    (autocast keeps fp32 weights, so fp32 uplinks)."""
    return getattr(torch, cfg.train.half_dtype) if cfg.train.is_enable_half else torch.float32


def build_lora_fedavg(ctx: MethodContext) -> Method:
    """FedIT or FFA-LoRA, wrapped by GMFL when ``gmfl.use`` is set."""
    cfg, variant = ctx.cfg, ctx.cfg.method
    masking, candidates = None, []
    if cfg.gmfl.use:
        candidates = mask_candidate_keys(list(ctx.initial), variant)
        masking = GlobalMasking(cfg.gmfl, candidates, seed=derive_seed(cfg.seed, "gmfl"))
    stateful = cfg.gmfl.use and cfg.gmfl.downlink == "stateful_sync"
    strategy = LoraFedAvg(ctx.initial, variant=variant, masking=masking,
                          downlink="stateful_sync" if stateful else "stateless")
    info = {"mask_candidates": len(candidates)} if cfg.gmfl.use else {}
    cap = processed_samples_cap(cfg.federate.client_weight, batch_size=cfg.dataloader.batch_size,
                                local_steps=cfg.train.local_update_steps, batch_or_epoch=cfg.train.batch_or_epoch)
    return Method(strategy, LoraClient(variant, candidates, stateful=stateful, samples_cap=cap), info)


register_method("fedit", build_lora_fedavg)
register_method("ffa_lora", build_lora_fedavg)


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


register_method("fedhft", build_fedhft)


def build_hafl(ctx: MethodContext) -> Method:
    """HAFL (ITALoRA / IFALoRA / IFZLoRA / HomLoRA): seeded client profiles, strategy and client."""
    cfg, h = ctx.cfg, ctx.cfg.hafl
    r_max = cfg.lora.r
    profile_of, trained = client_capacities(h, num_clients=cfg.federate.client_num, r_max=r_max, seed=cfg.seed)
    strategy = HAFLStrategy(ctx.initial, h, trained=trained, lr=cfg.train.optimizer.lr)
    client = HAFLClient(h.scheme, rank=r_max, alpha=cfg.lora.lora_alpha, scaling=h.scaling, train_head=h.train_head,
                        model_provider=ctx.model_provider)
    info = {"scheme": h.scheme, "aggregation": h.aggregation, "r_max": r_max,
            "profiles": profile_report(h, profile_of, r_max)}
    return Method(strategy, client, info)


register_method("hafl", build_hafl)


def host_model(ctx: MethodContext) -> nn.Module:
    """The host's model, required by methods that train backbone weights."""
    if ctx.model is None:
        raise InputError(f"federate.method '{ctx.cfg.method}' trains backbone weights and needs the host's model "
                         "(MethodContext.model)")
    return ctx.model


def build_fedkrso(ctx: MethodContext) -> Method:
    """FedKRSO on the targeted linear layers of the host's model; the head is averaged normally."""
    cfg = ctx.cfg.fedkrso
    model = host_model(ctx)
    layers = resolve_targets(model, cfg.target_modules, key="fedkrso.target_modules")
    disable_lora_branches(model)
    weights = {name: w.detach() for name, w in target_weights(model, layers).items()}
    head = {k: v for k, v in ctx.initial.items() if kind_of(k) == HEAD}
    strategy = FedKRSOServer(cfg, layers, weights, head, seed=derive_seed(ctx.cfg.seed, "fedkrso"))
    client = FedKRSOClient(cfg, layers, list(head), weight_decay=ctx.cfg.train.optimizer.weight_decay)
    info = {"target_layers": len(layers), "targeted_params": sum(w.numel() for w in weights.values()),
            "rows_R": sum(layer.d_out for layer in layers), "head_params": sum(v.numel() for v in head.values())}

    def load_global(target: nn.Module) -> None:
        client.load_host_state_dict(target, {"version": strategy.version, "weights": strategy.weights})
        load_model_tensors(target, strategy.head)

    return Method(strategy, client, info, load_global=load_global,
                  clients_reset=lambda: strategy.client_version.clear())


def build_fft(ctx: MethodContext) -> Method:
    """Federated full fine-tuning: FedAvg of the targeted weights and the head, sent in full both ways."""
    model = host_model(ctx)
    layers = resolve_targets(model, ctx.cfg.fft.target_modules, key="fft.target_modules")
    disable_lora_branches(model)
    initial = {name: w.detach() for name, w in target_weights(model, layers).items()}
    initial.update({k: v for k, v in ctx.initial.items() if kind_of(k) == HEAD})
    strategy = LoraFedAvg(initial, variant="fedit")
    strategy.name = "fft"
    info = {"target_layers": len(layers), "trained_params": sum(v.numel() for v in initial.values())}
    return Method(strategy, FullWeightClient(list(initial)), info,
                  load_global=lambda target: load_model_tensors(target, strategy.global_adapter()))


register_method("fedkrso", build_fedkrso)
register_method("fft", build_fft)
