"""Per-round communication estimates without weights (``fs-gmfl comm``).

The model is built on the meta device, so a GPT-2-Large- or LLaMA-7B-shaped
configuration is costed in seconds without downloading anything. Estimates
come from the same message-building code as real runs: the strategy writes
real (meta) downlinks, and the uplink holds exactly the tensors a client
trains, so byte counts are ``numel * element_size`` of what would be sent.
Each method's spec names its estimator (:attr:`MethodSpec.estimate`); the result is plain JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.adapter import HEAD, LORA_A, LORA_B, kind_of
from fs_gmfl.core.fedavg import base_trainable_keys, mask_candidate_keys
from fs_gmfl.core.fedhft import downlink_message as fedhft_downlink
from fs_gmfl.core.fedhft import ops as fedhft_ops
from fs_gmfl.core.fedhft import uplink_message as fedhft_uplink
from fs_gmfl.core.gmfl import ops as gmfl_ops
from fs_gmfl.core.message import Message, samples_tensor, tensor_bytes
from fs_gmfl.core.registry import Estimator, method_specs, spec_of
from fs_gmfl.errors import ConfigError
from fs_gmfl.methods import MethodContext, build_method

MIB = 1024 * 1024


class _Estimators(Mapping[str, Estimator]):
    """Method name -> its estimator (:attr:`MethodSpec.estimate`), read from the registry."""

    def __getitem__(self, name: str) -> Estimator:
        fn = spec_of(name).estimator()
        if fn is None:
            raise KeyError(name)
        return fn

    def __iter__(self) -> Iterator[str]:
        return iter([spec.name for spec in method_specs() if spec.estimate is not None])

    def __len__(self) -> int:
        return len(list(self))


#: estimators of the registered methods, by method name.
ESTIMATORS: Mapping[str, Estimator] = _Estimators()


def adapter_summary(initial: dict[str, Tensor]) -> dict[str, Any]:
    """Counts of LoRA tensors and parameters, head parameters, element size."""
    lora = [k for k in initial if kind_of(k) in (LORA_A, LORA_B)]
    head = [k for k in initial if kind_of(k) == HEAD]
    any_tensor = next(iter(initial.values()))
    return {"lora_tensors": len(lora), "lora_params": sum(initial[k].numel() for k in lora),
            "head_params": sum(initial[k].numel() for k in head), "element_bytes": any_tensor.element_size(),
            "dtype": str(any_tensor.dtype).replace("torch.", "")}


def breakdown(message: Message) -> dict[str, int]:
    """Bytes of a message by kind: ``lora_bytes``, ``head_bytes``, ``other_bytes``, ``control_bytes``, ``bytes``."""
    out = {"lora_bytes": 0, "head_bytes": 0, "other_bytes": 0}
    for key, t in message.tensors.items():
        kind = kind_of(key)
        out["lora_bytes" if kind in (LORA_A, LORA_B) else "head_bytes" if kind == HEAD else "other_bytes"] += \
            tensor_bytes(t)
    out["control_bytes"] = message.control_bytes
    out["bytes"] = message.nbytes
    return out


def uplink_message(initial: dict[str, Tensor], keys: list[str]) -> Message:
    """The uplink a client training ``keys`` sends (tensors plus sample count)."""
    return Message({k: initial[k] for k in keys}, {"num_samples": samples_tensor(1)})


def per_round_totals(profiles: dict[str, dict[str, Any]], clients: int) -> dict[str, Any]:
    """Expected bytes of all ``clients`` sampled clients of a round, profiles weighted by their share."""
    out: dict[str, Any] = {"clients": clients}
    for direction in ("uplink", "downlink"):
        for part in ("lora_bytes", "head_bytes", "other_bytes", "control_bytes", "bytes"):
            value = clients * sum(p["clients_share"] * p[direction][part] for p in profiles.values())
            out[f"{direction}_{part}"] = value
        out[f"{direction}_mib"] = out[f"{direction}_bytes"] / MIB
        out[f"{direction}_lora_mib"] = out[f"{direction}_lora_bytes"] / MIB
    return out


def estimate_lora_fedavg(cfg: RunConfig, initial: dict[str, Tensor]) -> dict[str, Any]:
    """FedIT / FFA-LoRA (+GMFL): bytes per client per round, and GMFL's schedule.

    With GMFL the frozen tensors depend on training; each schedule block
    reports the uplink if the smallest or the largest candidate tensors were
    the frozen ones (equal when all candidates have the same size).
    """
    method = build_method(MethodContext(cfg, initial))
    downlink = breakdown(method.strategy.configure_round(1, [0])[0])
    uplink = breakdown(uplink_message(initial, base_trainable_keys(list(initial), cfg.method)))
    profiles = {"default": {"clients_share": 1.0, "uplink": uplink, "downlink": downlink}}
    out: dict[str, Any] = {"profiles": profiles,
                           "per_round": per_round_totals(profiles, cfg.federate.clients_per_round())}
    if cfg.gmfl.use:
        candidates = mask_candidate_keys(list(initial), cfg.method)
        out["gmfl"] = gmfl_schedule_bytes(cfg, [tensor_bytes(initial[k]) for k in candidates], uplink["bytes"])
    return out


def gmfl_schedule_bytes(cfg: RunConfig, unit_bytes: list[int], base_up: int) -> dict[str, Any]:
    """GMFL freeze schedule with per-client uplink bounds per block and the time-averaged saving.

    Args:
        cfg: the run configuration (``gmfl`` section, rounds).
        unit_bytes: the uplink bytes each mask unit costs a client (what freezing it saves).
        base_up: the client's uplink bytes with nothing frozen.
    """
    g = cfg.gmfl
    sizes = sorted(unit_bytes)
    rows = gmfl_ops.schedule(cfg.federate.total_round_num, period=g.period, c=g.c, beta=g.beta,
                             max_ratio=g.max_ratio, n=len(sizes))
    mask_bytes = (len(sizes) + 7) // 8
    weighted_min = weighted_max = 0.0
    for row in rows:
        k = int(row["frozen"])
        row["uplink_bytes_max"] = base_up - sum(sizes[:k])
        row["uplink_bytes_min"] = base_up - (sum(sizes[-k:]) if k else 0)
        span = row["last_round"] - row["first_round"] + 1
        weighted_min += span * row["uplink_bytes_min"]
        weighted_max += span * row["uplink_bytes_max"]
    total_rounds = cfg.federate.total_round_num
    return {"candidates": len(sizes), "mask_bytes": mask_bytes, "schedule": rows,
            "mean_uplink_saving_min": 1 - weighted_max / (total_rounds * base_up),
            "mean_uplink_saving_max": 1 - weighted_min / (total_rounds * base_up)}


def estimate_fedhft(cfg: RunConfig, initial: dict[str, Tensor]) -> dict[str, Any]:
    """FedHFT: one profile per resource level, from the same message builders as real runs.

    Uplink of a level-s client: full ``A``, ``k = max(1, round(s d_out))``
    rows of ``B`` and their encoding, the head and the sample count;
    downlink: the rank-r personalised factors (same shapes as A and B), the
    head, the level and a seed. Round 1's downlink carries the head only.
    """
    method = build_method(MethodContext(cfg, initial))
    levels = method.strategy.levels
    layout = method.strategy.layout
    head = {k: initial[k] for k in layout.head_keys}
    factors = {k: initial[k] for p in layout.pairs for k in (p.a_key, p.b_key)}
    profiles: dict[str, dict[str, Any]] = {}
    for level, ratio in enumerate(cfg.fedhft.keep_ratios):
        kept = {m: fedhft_ops.kept_row_count(ratio, shape[0]) for m, shape in layout.shapes.items()}

        def uplink(pairs: tuple[Any, ...], kept: dict[str, int] = kept) -> Message:
            a = {p.a_key: initial[p.a_key] for p in pairs}
            return fedhft_uplink(dataclasses.replace(layout, pairs=pairs), a,
                                 {p.b_key: initial[p.b_key][: kept[p.module]] for p in pairs},
                                 {p.module: torch.arange(kept[p.module]) for p in pairs}, head, 1)

        profiles[f"level_{level}"] = {
            "clients_share": levels.count(level) / len(levels), "keep_ratio": ratio,
            "kept_rows": sum(kept.values()), "uplink": breakdown(uplink(layout.pairs)),
            "downlink": breakdown(fedhft_downlink(head, factors, level=level, seed=0)),
            **_unit_savings(cfg, layout.pairs, uplink)}
    return {"profiles": profiles, "per_round": per_round_totals(profiles, cfg.federate.clients_per_round()),
            "first_round_downlink": breakdown(fedhft_downlink(head, None, level=0, seed=0))}


def _unit_savings(cfg: RunConfig, pairs: Sequence[Any],
                  uplink: Callable[[tuple[Any, ...]], Message]) -> dict[str, Any]:
    """Under GMFL with one module per mask unit: the bytes each frozen module saves a client and the schedule.

    ``uplink(pairs)`` builds the client's real uplink with only ``pairs``
    (modules) in it; a module's saving is the difference it makes.
    """
    if not cfg.gmfl.use:
        return {}
    full = uplink(tuple(pairs)).nbytes
    unit_bytes = [full - uplink(tuple(p for p in pairs if p != frozen)).nbytes for frozen in pairs]
    return {"gmfl_unit_uplink_bytes": unit_bytes, "gmfl": gmfl_schedule_bytes(cfg, unit_bytes, full)}


def estimate_hafl(cfg: RunConfig, initial: dict[str, Tensor]) -> dict[str, Any]:
    """HAFL: per profile, the real round-1 downlink and the uplink of its n_k components; shares from the assignment.

    Per-round figures are expectations over uniform client sampling
    (``clients x sum(share x bytes)``), e.g. 52.17 MiB of fp32 LoRA uplink for
    GPT-2 Large with the paper's 33/33/34 profiles.
    """
    from fs_gmfl.core.hafl import HAFLStrategy, build_uplink

    method = build_method(MethodContext(cfg, initial))
    strategy = getattr(method.strategy, "base", method.strategy)  # the HAFL strategy, also when GMFL wraps it
    assert isinstance(strategy, HAFLStrategy)
    profiles: dict[str, dict[str, Any]] = {}
    for row in method.info["profiles"]:
        if not row["client_ids"]:
            continue
        cid = row["client_ids"][0]
        downlink = strategy.configure_round(1, [cid])[cid]
        factors = {**downlink.tensors, **{k: initial[k] for k in strategy.head_keys}}
        selected = strategy.pending[cid]

        def uplink(pairs: tuple[Any, ...], factors: dict[str, Tensor] = factors,
                   selected: Tensor = selected) -> Message:
            rows = [strategy.pairs.index(p) for p in pairs]
            return build_uplink(factors, pairs, selected[rows], rank=strategy.rank, num_samples=1,
                                truncated=cfg.hafl.scheme == "truncation")

        profiles[row["name"]] = {"clients_share": row["clients"] / cfg.federate.client_num,
                                 "trained_components": row["trained_components"],
                                 "uplink": breakdown(uplink(tuple(strategy.pairs))), "downlink": breakdown(downlink),
                                 **_unit_savings(cfg, strategy.pairs, uplink)}
    return {"scheme": cfg.hafl.scheme, "aggregation": cfg.hafl.aggregation, "profiles": profiles,
            "per_round": per_round_totals(profiles, cfg.federate.clients_per_round())}


def _meta_targets(cfg: RunConfig, requested: list[str], key: str) -> tuple[list[Any], dict[str, Tensor], list[str]]:
    """Targeted layers, their weights and the target list of ``cfg``'s backbone built on the meta device."""
    from fs_gmfl.core.targets import default_targets, resolve_targets, target_weights
    from fs_gmfl.hosts.common.models import build_backbone

    model = build_backbone(cfg, estimated_num_labels(cfg), meta=True).model
    layers = resolve_targets(model, requested, key=key)
    weights = {k: w.detach() for k, w in target_weights(model, layers).items()}
    return layers, weights, list(requested) or default_targets(model)


def _trained_summary(weights: dict[str, Tensor], head: dict[str, Tensor]) -> dict[str, Any]:
    any_tensor = next(iter(weights.values()))
    return {"targeted_params": sum(w.numel() for w in weights.values()),
            "head_params": sum(v.numel() for v in head.values()), "element_bytes": any_tensor.element_size(),
            "dtype": str(any_tensor.dtype).replace("torch.", "")}


def _affine_bytes(build: Callable[[int], Message], x: float) -> dict[str, float]:
    """Bytes of a message whose size is affine in a count, at a fractional count ``x`` (from two real messages)."""
    one, two = breakdown(build(1)), breakdown(build(2))
    return {k: one[k] + (two[k] - one[k]) * (x - 1) for k in one}


def estimate_fedkrso(cfg: RunConfig, initial: dict[str, Tensor]) -> dict[str, Any]:
    """FedKRSO bytes per client and round, with FedIT LoRA (same rank and targets) and full fine-tuning.

    Messages are built by FedKRSO's own wire code on meta tensors. Expected
    values use ``E|U_n| = K (1 - (1 - 1/K)^I)`` seeds per client (``I``
    intervals) and ``E|U| = K (1 - (1 - 1/K)^(I C))`` seeds per round (``C``
    clients), exact because messages are affine in the number of seeds.
    """
    from fs_gmfl.core.fedkrso import wire
    from fs_gmfl.core.fedkrso.ops import expected_seeds_used, intervals_per_round, layer_rank

    k = cfg.fedkrso
    layers, weights, targets = _meta_targets(cfg, k.target_modules, "fedkrso.target_modules")
    head = {key: v for key, v in initial.items() if kind_of(key) == HEAD}
    dtype = next(iter(weights.values())).dtype
    clients = cfg.federate.clients_per_round()
    intervals = intervals_per_round(cfg.train.local_update_steps, k.interval)

    def accumulators(used: int) -> dict[int, dict[str, Tensor]]:
        return {s: {la.name: torch.empty(la.d_out, layer_rank(la, k.rank), dtype=dtype, device="meta")
                    for la in layers} for s in range(used)}

    def uplink(used: int, all_slots: bool = False) -> Message:
        return wire.uplink_message(accumulators(used), layers, rank=k.rank, num_seeds=k.num_seeds, head=head,
                                   num_samples=1, all_slots=all_slots, dtype=dtype, device="meta")

    def downlink(used: int) -> Message:
        acc = accumulators(used)
        entry = wire.LogEntry(1, list(range(used)),
                              {la.name: torch.stack([acc[s][la.name] for s in range(used)]) for la in layers})
        return wire.downlink_message(seeds=range(k.num_seeds), schedule_seed=0, version=1, head=head, replay=[entry])

    per_client = expected_seeds_used(k.num_seeds, intervals)
    per_round = expected_seeds_used(k.num_seeds, intervals * clients)
    full_sync = breakdown(wire.downlink_message(seeds=range(k.num_seeds), schedule_seed=0, version=1, head=head,
                                                full=weights))
    lora = {f"{la.name}.lora_{f}": torch.empty(shape, dtype=dtype, device="meta") for la in layers
            for f, shape in (("A", (k.rank, la.d_in)), ("B", (la.d_out, k.rank)))}
    fft = breakdown(uplink_message({**weights, **head}, list({**weights, **head})))
    profiles = {
        "expected": {"clients_share": 1.0, "uplink": _affine_bytes(uplink, per_client),
                     "downlink": _affine_bytes(downlink, per_round)},
    }
    return {
        "target_modules": targets,
        "adapter": _trained_summary(weights, head),
        "fedkrso": {"layers": len(layers), "rows_R": sum(la.d_out for la in layers), "num_seeds": k.num_seeds,
                    "rank": k.rank, "interval": k.interval, "local_steps": cfg.train.local_update_steps,
                    "intervals": intervals, "expected_seeds_per_client": per_client,
                    "expected_seeds_per_round": per_round},
        "uplink_bytes": {"one_seed": breakdown(uplink(1))["bytes"], "expected": profiles["expected"]["uplink"]["bytes"],
                         "all_slots": breakdown(uplink(0, all_slots=True))["bytes"]},
        "downlink_bytes": {"one_round_expected": profiles["expected"]["downlink"]["bytes"],
                           "one_round_all_seeds": breakdown(downlink(k.num_seeds))["bytes"],
                           "full_sync": full_sync["bytes"]},
        "baselines_uplink_bytes": {"fedit_lora_same_rank_and_targets": breakdown(uplink_message(
            {**lora, **head}, list({**lora, **head})))["bytes"], "fft_targeted_and_head": fft["bytes"]},
        "profiles": profiles,
        "per_round": per_round_totals(profiles, clients),
    }


def estimate_fft(cfg: RunConfig, initial: dict[str, Tensor]) -> dict[str, Any]:
    """Federated full fine-tuning: the targeted weights and the head, each way."""
    _, weights, targets = _meta_targets(cfg, cfg.fft.target_modules, "fft.target_modules")
    head = {k: v for k, v in initial.items() if kind_of(k) == HEAD}
    trained = {**weights, **head}
    message = breakdown(uplink_message(trained, list(trained)))
    down = dict(message, control_bytes=0, bytes=message["bytes"] - message["control_bytes"])
    profiles = {"default": {"clients_share": 1.0, "uplink": message, "downlink": down}}
    return {"target_modules": targets, "adapter": _trained_summary(weights, head), "profiles": profiles,
            "per_round": per_round_totals(profiles, cfg.federate.clients_per_round())}


def estimated_num_labels(cfg: RunConfig) -> int:
    """Head classes: ``model.num_labels``, else the packaged dataset's, else 2 (user files are not read)."""
    from fs_gmfl.hosts.common.data import declared_num_labels

    return cfg.model.num_labels or declared_num_labels(cfg.data) or 2


def estimate(cfg: RunConfig) -> dict[str, Any]:
    """Build ``cfg``'s model on the meta device and estimate bytes per round."""
    from fs_gmfl.core.adapter import adapter_parameters
    from fs_gmfl.hosts.common.models import build_backbone

    estimator = spec_of(cfg.method).estimator()
    if estimator is None:
        raise ConfigError("federate.method", cfg.federate.method, "a method with a byte estimator for 'fs-gmfl "
                          f"comm': one of {', '.join(repr(name) for name in ESTIMATORS)}")
    num_labels = estimated_num_labels(cfg)
    backbone = build_backbone(cfg, num_labels, meta=True)
    initial = {k: p.detach() for k, p in adapter_parameters(backbone.model).items()}
    result = {"model": cfg.model.type, "method": cfg.method + ("+gmfl" if cfg.gmfl.use else ""),
              "target_modules": backbone.target_modules, "num_labels": num_labels,
              "adapter": adapter_summary(initial)}
    result.update(estimator(cfg, initial))
    return result
