"""Federated full fine-tuning (baseline) as a registered method."""

from __future__ import annotations

from fs_gmfl.core.adapter import HEAD, kind_of, load_model_tensors
from fs_gmfl.core.fedavg.strategy import LoraFedAvg
from fs_gmfl.core.fft.client import FullWeightClient
from fs_gmfl.core.fft.config import FFTConfig
from fs_gmfl.core.fft.estimate import estimate_fft
from fs_gmfl.core.registry import Method, MethodContext, MethodSpec
from fs_gmfl.core.targets import disable_lora_branches, resolve_targets, target_weights


def build_fft(ctx: MethodContext) -> Method:
    """Federated full fine-tuning: FedAvg of the targeted weights and the head, sent in full both ways."""
    model = ctx.host_model()
    layers = resolve_targets(model, ctx.cfg.fft.target_modules, key="fft.target_modules")
    disable_lora_branches(model)
    initial = {name: w.detach() for name, w in target_weights(model, layers).items()}
    initial.update({k: v for k, v in ctx.initial.items() if kind_of(k) == HEAD})
    strategy = LoraFedAvg(initial, variant="fedit")
    strategy.name = "fft"
    info = {"target_layers": len(layers), "trained_params": sum(v.numel() for v in initial.values())}
    return Method(strategy, FullWeightClient(list(initial)), info,
                  load_global=lambda target: load_model_tensors(target, strategy.global_adapter()))


FFT = MethodSpec(
    name="fft", build=build_fft, config_section="fft", config_class=FFTConfig, trains_backbone=True,
    summary="federated full fine-tuning of the targeted weights and the head (baseline)",
    estimate=estimate_fft,
    gmfl_refusal="False with federate.method 'fft': GMFL freezes LoRA adapter units and full fine-tuning has "
                 "none (its wrapper interface is not implemented for whole weight matrices)",
    example_overrides=("federate.method", "fft"))
SPECS = [FFT]
