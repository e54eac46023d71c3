"""LoRA-A2's bytes per round without weights (``fs-gmfl comm``), alternating with the round's parity.

Odd rounds upload ``lora_B`` and the head, even rounds ``lora_A`` and the
head (spec GMFL.md section 7.4); the downlink is the whole adapter and one
parity byte in every round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fs_gmfl.core.estimate import breakdown, per_round_totals, uplink_message
from fs_gmfl.core.lora_a2.ops import trained_factor

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
    return {"by_parity": by_parity, "profiles": mean, "per_round": per_round_totals(mean, clients),
            "per_round_is": "the mean of an odd and an even round (by_parity gives each)"}
