"""LoRA-A2's bytes per round without weights (``fs-gmfl comm``), alternating with the round's parity.

Odd rounds upload ``lora_B`` and the head, even rounds ``lora_A`` and the
head (spec GMFL.md section 7.4); the downlink is the whole adapter and one
parity byte in every round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fs_gmfl.core.adapter import kind_of
from fs_gmfl.core.estimate import breakdown, per_round_totals, uplink_message
from fs_gmfl.core.gmfl.ops import frozen_count
from fs_gmfl.core.lora_a2.masking import remask_ratio
from fs_gmfl.core.lora_a2.ops import trained_factor
from fs_gmfl.core.message import tensor_bytes

if TYPE_CHECKING:
    from fs_gmfl.core.registry import EstimateContext

#: the two kinds of round, each with a round number of that parity.
PARITIES = {"odd": 1, "even": 2}


def round_profiles(ctx: EstimateContext, strategy: Any, rnd: int) -> dict[str, Any]:
    """One client's uplink and downlink breakdown in a round of ``rnd``'s parity, from the strategy's messages."""
    downlink = breakdown(strategy.configure_round(rnd, [0])[0])
    uplink = breakdown(uplink_message(ctx.initial, strategy.trainable_keys()))
    return {"default": {"clients_share": 1.0, "uplink": uplink, "downlink": downlink}}


def mean_profiles(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The per-part mean of two rounds' profiles (bytes per round over a pair of rounds)."""
    one, two = first["default"], second["default"]
    return {"default": {"clients_share": 1.0, **{direction: {part: (one[direction][part] + two[direction][part]) / 2
                                                             for part in one[direction]}
                                                 for direction in ("uplink", "downlink")}}}


def estimate(ctx: EstimateContext) -> dict[str, Any]:
    """Bytes per round: ``by_parity`` (odd and even rounds, exact) and their mean (``profiles``, ``per_round``)."""
    strategy = ctx.build_method().strategy
    clients = ctx.cfg.federate.clients_per_round()
    by_parity = {}
    for name, rnd in PARITIES.items():
        profiles = round_profiles(ctx, strategy, rnd)
        by_parity[name] = {"trains": trained_factor(rnd), "profiles": profiles,
                           "per_round": per_round_totals(profiles, clients)}
    mean = mean_profiles(by_parity["odd"]["profiles"], by_parity["even"]["profiles"])
    out = {"by_parity": by_parity, "profiles": mean, "per_round": per_round_totals(mean, clients),
           "per_round_is": "the mean of an odd and an even round (by_parity gives each)"}
    if ctx.cfg.gmfl.use:
        uplinks = {trained_factor(rnd): by_parity[name]["profiles"]["default"]["uplink"]["bytes"]
                   for name, rnd in PARITIES.items()}
        out["gmfl"] = gmfl_schedule(ctx, list(strategy.mask_units()), uplinks)
    return out


def gmfl_schedule(ctx: EstimateContext, units: list[str], uplinks: dict[str, float]) -> dict[str, Any]:
    """Under GMFL (spec 7.4): per block of rounds training one factor with one ratio, how many of its tensors are
    frozen (no ties; the re-mask after round ``t - 2`` applies in round ``t``, none in rounds 1 and 2) and a client's
    uplink if the smallest or the largest were the frozen ones; the mask (one bit per tensor) rides on every
    downlink from round 2 on.

    Args:
        units: the mask units (every LoRA tensor key).
        uplinks: a client's uplink bytes without a mask, by trained factor.
    """
    cfg = ctx.cfg
    blocks: list[dict[str, Any]] = []
    open_block: dict[str, dict[str, Any]] = {}  # the last block of each factor
    saved_min = saved_max = 0.0
    for rnd in range(1, cfg.federate.total_round_num + 1):
        factor = trained_factor(rnd)
        sizes = sorted(tensor_bytes(ctx.initial[k]) for k in units if kind_of(k) == factor)
        ratio = remask_ratio(rnd - 2, cfg.gmfl) if rnd > 2 else 0.0
        frozen = frozen_count(ratio, len(sizes))
        smallest, largest = sum(sizes[:frozen]), sum(sizes[len(sizes) - frozen:])
        row = {"trains": factor, "ratio": ratio, "frozen": frozen, "of": len(sizes),
               "uplink_bytes_max": uplinks[factor] - smallest, "uplink_bytes_min": uplinks[factor] - largest}
        saved_min, saved_max = saved_min + smallest / uplinks[factor], saved_max + largest / uplinks[factor]
        block = open_block.get(factor)
        if block is not None and all(block[k] == v for k, v in row.items()):
            block["last_round"] = rnd
        else:
            open_block[factor] = {"first_round": rnd, "last_round": rnd, **row}
            blocks.append(open_block[factor])
    rounds = cfg.federate.total_round_num
    return {"candidates": len(units), "mask_bytes": (len(units) + 7) // 8, "schedule": blocks,
            "schedule_is": "blocks of every other round (first_round, first_round + 2, ..., last_round)",
            "mean_uplink_saving_min": saved_min / rounds, "mean_uplink_saving_max": saved_max / rounds}
