"""Rounds in which every client update was rejected (issue 28): seen, recorded, and the run stops (exit 1).

The simulator's fault injection makes clients hostile (``faults.nan_clients``: every uplink NaN, so the uplink
gate rejects it). Each such round logs a warning and is listed in ``summary.json``
(``rejected_updates.all_rejected_rounds``); after ``federate.max_rejected_rounds`` of them in a row the run writes
its outputs and stops with one line and exit status 1 (0: it never stops).
"""

from __future__ import annotations

import json
import logging

import pytest

from fs_gmfl.hosts.sim.records import all_rejected_rounds, rejection_streak
from tests.test_bad_input_table import BASE, run_cli

pytestmark = pytest.mark.usefixtures("single_thread")

#: two clients, both sampled every round, both hostile.
HOSTILE = [*BASE, "federate.total_round_num", "5", "faults.nan_clients", "[0, 1]"]
ALL_REJECTED = "every update that arrived (2) was rejected; the global model is unchanged"


def test_the_run_stops_after_max_rejected_rounds_all_rejected_rounds_in_a_row(tmp_path, capsys, caplog):
    """Default 3: rounds 1-3 each log a warning, then one error line and exit 1; summary.json records the rounds
    and why the run stopped, and the model (its metrics) never moved."""
    with caplog.at_level(logging.WARNING):
        code, lines = run_cli(["run", "--cfg", "/dev/null", "--quiet", *HOSTILE, "outdir", str(tmp_path)], capsys)
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("fs-gmfl: error: run stopped after round 3: every client update "
                                                   "that arrived was rejected in 3 rounds in a row"), lines
    assert "federate.max_rejected_rounds = 3" in lines[0]
    warned = [r.getMessage() for r in caplog.records if ALL_REJECTED in r.getMessage()]
    assert [w.split(":")[0] for w in warned] == ["round 1", "round 2", "round 3"]
    summary = json.loads((tmp_path / "fedit" / "summary.json").read_text(encoding="utf-8"))
    assert summary["rounds"] == 3 and summary["stopped"]["after_round"] == 3
    assert summary["rejected_updates"]["all_rejected_rounds"] == [1, 2, 3]
    assert summary["rejected_updates"]["total"] == 6
    assert [r["round"] for r in summary["per_round"]] == [0, 1, 2, 3]
    assert summary["final"] == {k: v for k, v in summary["per_round"][0].items() if k.startswith("test_")}
    assert (tmp_path / "fedit" / "curves.png").exists()


def test_max_rejected_rounds_0_never_stops_but_still_records_every_such_round(tmp_path, capsys):
    """``federate.max_rejected_rounds 0``: all 5 rounds run, exit 0, each all-rejected round listed."""
    code, lines = run_cli(["run", "--cfg", "/dev/null", "--quiet", *HOSTILE, "outdir", str(tmp_path),
                           "federate.max_rejected_rounds", "0"], capsys)
    assert code == 0 and not lines, lines
    summary = json.loads((tmp_path / "fedit" / "summary.json").read_text(encoding="utf-8"))
    assert summary["stopped"] is None and summary["rounds"] == 5
    assert summary["rejected_updates"]["all_rejected_rounds"] == [1, 2, 3, 4, 5]


def row(rnd: int, replies: int, rejected: int) -> dict:
    return {"round": rnd, "replies": replies, "rejected": rejected}


def test_a_round_without_replies_neither_counts_nor_breaks_the_streak_and_an_accepted_update_ends_it():
    """The streak counts all-rejected rounds at the end; empty rounds are skipped; an accepted update resets it."""
    rows = [{"round": 0}, row(1, 2, 2), row(2, 2, 1), row(3, 2, 2), row(4, 0, 0), row(5, 1, 1)]
    assert all_rejected_rounds(rows) == [1, 3, 5]
    assert rejection_streak(rows) == [3, 5]
    assert rejection_streak([*rows, row(6, 2, 1)]) == []
    assert rejection_streak([{"round": 0}, row(1, 0, 0)]) == []
