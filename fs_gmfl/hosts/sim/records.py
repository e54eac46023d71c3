"""The simulator's run records: what a checkpoint keeps besides the strategy state, and rounds nobody moved.

:data:`RUN_RECORDS` names every record :meth:`Simulation.save
<fs_gmfl.hosts.sim.runner.Simulation.save>` writes into a checkpoint's
manifest, with the parser that reads it back; a missing or malformed record
refuses the checkpoint before anything is restored
(:func:`~fs_gmfl.hosts.sim.checkpoint.load_checkpoint`).

A round is *all-rejected* when replies arrived and the uplink gate rejected
every one of them: the global model did not move although clients answered
(a broken or hostile federation, not a slow one). Rows of ``per_round`` hold
``replies`` (arrived in time) and ``rejected``; a round without replies is
neither all-rejected nor accepting, so it does not break a run of
all-rejected rounds (:func:`rejection_streak`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fs_gmfl.core.comm import CommLedger


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"a {type(value).__name__}, not a list")
    return value


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise TypeError(f"a {type(value).__name__}, not a mapping")
    return {str(k): int(n) for k, n in value.items()}


def _rows(value: Any) -> list[dict[str, Any]]:
    rows = _list(value)
    if not all(isinstance(row, dict) for row in rows):
        raise TypeError("a row is not a mapping")
    return [dict(row) for row in rows]


def _ledger(value: Any) -> CommLedger:
    ledger = CommLedger()
    ledger.load_state_dict(_list(value))
    return ledger


def _eval_records(value: Any) -> list[tuple[int, dict[str, float]]]:
    return [(int(rnd), dict(metrics)) for rnd, metrics in _list(value)]


#: record name -> parser (raises ``TypeError``/``ValueError``/``KeyError`` on a malformed value).
RUN_RECORDS: dict[str, Callable[[Any], Any]] = {
    "per_round": _rows,
    "ledger": _ledger,
    "step_seconds": lambda value: [float(x) for x in _list(value)],
    "rejections": _counts,
    "fault_counts": _counts,
    "empty_rounds": lambda value: [int(r) for r in _list(value)],
    "eval_records": _eval_records,
}


def is_all_rejected(row: Mapping[str, Any]) -> bool:
    """Replies arrived in this round and every one was rejected."""
    rejected = int(row.get("rejected", 0))
    return rejected > 0 and rejected >= int(row.get("replies", 0))


def all_rejected_rounds(per_round: Sequence[Mapping[str, Any]]) -> list[int]:
    """The all-rejected rounds of a run, in order."""
    return [int(row["round"]) for row in per_round if is_all_rejected(row)]


def rejection_streak(per_round: Sequence[Mapping[str, Any]]) -> list[int]:
    """The all-rejected rounds in a row at the end of ``per_round`` (rounds without replies skipped)."""
    streak: list[int] = []
    for row in reversed(per_round):
        if is_all_rejected(row):
            streak.insert(0, int(row["round"]))
        elif row.get("replies", 0):
            break
    return streak
