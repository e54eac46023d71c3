"""FedKRSO as a registered method: random-subspace training of the host model's targeted weights."""

from __future__ import annotations

from torch import nn

from fs_gmfl.core.adapter import HEAD, kind_of, load_model_tensors
from fs_gmfl.core.fedkrso.client import FedKRSOClient
from fs_gmfl.core.fedkrso.config import FedKRSOConfig
from fs_gmfl.core.fedkrso.strategy import FedKRSOStrategy
from fs_gmfl.core.fedkrso.estimate import estimate_fedkrso
from fs_gmfl.core.fedkrso.ops import layer_rank
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec
from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.core.targets import TargetLayer, disable_lora_branches, resolve_targets, target_weights
from fs_gmfl.errors import ConfigError


def build_fedkrso(ctx: MethodContext) -> Method:
    """FedKRSO on the targeted linear layers of the host's model; the head is averaged normally."""
    cfg = ctx.cfg.fedkrso
    model = ctx.host_model()
    layers = resolve_targets(model, cfg.target_modules, key="fedkrso.target_modules")
    if cfg.basis == "identity":
        require_full_rank(layers, cfg.rank)
    disable_lora_branches(model)
    weights = {name: w.detach() for name, w in target_weights(model, layers).items()}
    head = {k: v for k, v in ctx.initial.items() if kind_of(k) == HEAD}
    strategy = FedKRSOStrategy(cfg, layers, weights, head, seed=derive_seed(ctx.cfg.seed, "fedkrso"))
    client = FedKRSOClient(cfg, layers, list(head), weight_decay=ctx.cfg.train.optimizer.weight_decay)
    info = {"target_layers": len(layers), "targeted_params": sum(w.numel() for w in weights.values()),
            "rows_R": sum(layer.d_out for layer in layers), "head_params": sum(v.numel() for v in head.values())}

    def load_global(target: nn.Module) -> None:
        client.load_host_state_dict(target, {"version": strategy.version, "weights": strategy.weights})
        load_model_tensors(target, strategy.head)

    return Method(strategy, client, info, load_global=load_global,
                  clients_reset=lambda: strategy.client_version.clear())


def require_full_rank(layers: list[TargetLayer], rank: int) -> None:
    """``fedkrso.basis: identity`` needs every layer's subspace to be its whole input space (rank == d_in)."""
    short = next((layer for layer in layers if layer_rank(layer, rank) != layer.d_in), None)
    if short is not None:
        raise ConfigError("fedkrso.basis", "identity", f"'gaussian' or 'orthogonal' here: 'identity' needs "
                          f"min(fedkrso.rank, d_out) >= d_in for every targeted layer, and '{short.name}' "
                          f"(d_in {short.d_in}, d_out {short.d_out}) gets rank {layer_rank(short, rank)} "
                          f"with fedkrso.rank {rank}")


FEDKRSO = MethodSpec(
    name="fedkrso", build=build_fedkrso, config_section="fedkrso", config_class=FedKRSOConfig, trains_backbone=True,
    summary="full fine-tuning in shared random low-rank subspaces, sent as seeds and accumulators (FedKRSO)",
    estimate=estimate_fedkrso,
    gmfl_refusal="False with federate.method 'fedkrso': FedKRSO trains full weights through per-round random "
                 "subspaces, so there is no persistent adapter tensor whose global update GMFL could rank and freeze",
    example_overrides=("federate.method", "fedkrso", "fedkrso.num_seeds", "2", "fedkrso.interval", "1"))
SPECS = [FEDKRSO]
