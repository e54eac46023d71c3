"""GMFL's part of a base method's byte estimate (``fs-gmfl comm``): the freeze schedule and what it saves.

GMFL has no estimator of its own: it wraps a base method, and the base's estimator
(``fs_gmfl/core/<base>/estimate.py``) adds :func:`schedule_bytes` (or :func:`unit_savings`) when ``gmfl.use``
is set. Which units freeze depends on training, so each block of the schedule reports the uplink if the
smallest or the largest units were the frozen ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fs_gmfl.core.gmfl import ops
from fs_gmfl.core.message import Message

if TYPE_CHECKING:
    from fs_gmfl.config.schema import RunConfig


def schedule_bytes(cfg: RunConfig, unit_bytes: list[int], base_up: int) -> dict[str, Any]:
    """GMFL freeze schedule with per-client uplink bounds per block and the time-averaged saving.

    Args:
        cfg: the run configuration (``gmfl`` section, rounds).
        unit_bytes: the uplink bytes each mask unit costs a client (what freezing it saves).
        base_up: the client's uplink bytes with nothing frozen.
    """
    g = cfg.gmfl
    sizes = sorted(unit_bytes)
    rows = ops.schedule(cfg.federate.total_round_num, period=g.period, c=g.c, beta=g.beta,
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


def unit_savings(cfg: RunConfig, units: Sequence[Any], uplink: Callable[[tuple[Any, ...]], Message]) -> dict[str, Any]:
    """Under GMFL, for a base whose uplink is built per mask unit: the bytes each frozen unit saves a client and
    the schedule (nothing without ``gmfl.use``).

    ``uplink(units)`` builds the client's real uplink with only ``units`` in
    it; a unit's saving is the difference it makes.
    """
    if not cfg.gmfl.use:
        return {}
    full = uplink(tuple(units)).nbytes
    unit_bytes = [full - uplink(tuple(u for u in units if u != frozen)).nbytes for frozen in units]
    return {"gmfl_unit_uplink_bytes": unit_bytes, "gmfl": schedule_bytes(cfg, unit_bytes, full)}
