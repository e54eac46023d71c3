"""The outputs of a simulator run, and completing a finished run whose outputs were cut short.

:class:`RunWriter` writes ``<outdir>/<expname>/``: ``config.yaml`` and
``eval_results.log`` while the run goes on, then ``comm_log.jsonl``,
``summary.json`` and ``curves.png`` at the end, in that order. A run killed
between ``summary.json`` and the plot is finished (``summary.json`` holds its
results) but incomplete: ``fs-gmfl run --resume`` then calls
:func:`complete_finished_run`, which rebuilds each missing output from what
the run left (the plot from ``summary.json``, ``config.yaml`` from the
configuration, ``comm_log.jsonl`` and ``eval_results.log`` from a checkpoint
of the last round), says so in one line and changes nothing else.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fs_gmfl.config.loader import config_to_yaml
from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.comm import CommLedger
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.common.rundir import SUMMARY, dumps_strict, write_json_atomic, write_text_atomic
from fs_gmfl.hosts.sim.checkpoint import (flatten, identity, identity_of, latest_checkpoint_dir, read_manifest,
                                          read_records, refuse_changed_config)
from fs_gmfl.hosts.sim.records import RUN_RECORDS
from fs_gmfl.plots import plot_runs

CONFIG = "config.yaml"
EVAL_LOG = "eval_results.log"
COMM_LOG = "comm_log.jsonl"
CURVES = "curves.png"
#: every output of a finished run besides summary.json.
OUTPUTS = (CONFIG, EVAL_LOG, COMM_LOG, CURVES)


def eval_line(rnd: int, metrics: Mapping[str, float]) -> str:
    """A FederatedScope-style evaluation record (one JSON object and a newline)."""
    return dumps_strict({"Role": "Server #", "Round": rnd, "Results_raw": dict(metrics)}) + "\n"


def comm_log_text(ledger: CommLedger) -> str:
    """``comm_log.jsonl``: one JSON object per message."""
    return "".join(dumps_strict(t.as_row()) + "\n" for t in ledger.transfers)


def write_curves(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """``curves.png`` of a summary: its first reported test metric against rounds and uplink bytes."""
    metric = next((m for m in ("test_acc", "test_exact_match", "test_avg_loss")
                   if any(m in r for r in summary["per_round"])), "test_loss")
    plot_runs([(summary["run_name"], summary)], run_dir / CURVES, metric=metric, title=summary["run_name"])


class RunWriter:
    """Writes ``<outdir>/<expname>/``: config.yaml, eval_results.log, comm_log.jsonl, summary.json, curves.png."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / CONFIG, config_to_yaml(cfg))
        self.eval_log = run_dir / EVAL_LOG
        write_text_atomic(self.eval_log, "")

    def eval_line(self, rnd: int, metrics: Mapping[str, float]) -> None:
        """Append a FederatedScope-style evaluation record (one JSON object per line)."""
        with open(self.eval_log, "a", encoding="utf-8") as fh:
            fh.write(eval_line(rnd, metrics))

    def finish(self, summary: Mapping[str, Any], ledger: CommLedger) -> None:
        """Write the communication log, the summary (atomically) and the plot."""
        write_text_atomic(self.run_dir / COMM_LOG, comm_log_text(ledger))
        write_json_atomic(self.run_dir / SUMMARY, summary)
        write_curves(self.run_dir, summary)


# -- a finished run resumed ---------------------------------------------------------------------------------
def read_summary(run_dir: Path) -> dict[str, Any]:
    """The ``summary.json`` of a finished run.

    Raises:
        InputError: it cannot be read or is not a summary.
    """
    path = run_dir / SUMMARY
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict) or not isinstance(summary.get("per_round"), list):
            raise ValueError("not a run summary")
        int(summary["rounds"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path} cannot be read ({err}); pass --overwrite to run again") from None
    return summary


def completed_rounds(run_dir: Path) -> int | None:
    """Rounds of the finished run in ``run_dir`` (``None`` when it was stopped early: resuming may continue it)."""
    summary = read_summary(run_dir)
    return None if summary.get("stopped") else int(summary["rounds"])


def complete_finished_run(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """``--resume`` of a finished run: regenerate its missing outputs; its summary.

    Raises:
        ConfigError: the configuration differs from the run's (names the
            key), ``federate.total_round_num`` is below its rounds, or nothing
            is missing (the run is finished: nothing to resume).
        InputError: outputs are missing that nothing left can rebuild.
    """
    summary = read_summary(run_dir)
    rounds, total = int(summary["rounds"]), cfg.federate.total_round_num
    check_same_configuration(run_dir, cfg)
    missing = [name for name in OUTPUTS if not (run_dir / name).exists()]
    if total < rounds or not missing:
        raise ConfigError("federate.total_round_num", total, f"more than the {rounds} rounds already run (that run "
                          f"is finished{' with all its outputs; nothing to resume' * (not missing)})")
    made, lacking = regenerate(run_dir, cfg, summary, missing)
    unbuilt = (f"{', '.join(lacking)} (only a checkpoint of round {rounds} could rebuild "
               f"{'them' if len(lacking) > 1 else 'it'}: federate.save_freq)")
    if not made:
        raise InputError(f"the finished run in {run_dir} lacks {unbuilt}; pass --overwrite to run it again")
    print(f"fs-gmfl: {run_dir} holds a finished run of {rounds} rounds; regenerated its missing {', '.join(made)}"
          + (f"; still missing: {unbuilt}" if lacking else ""), file=sys.stderr)
    return summary


def check_same_configuration(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse ``cfg`` if it differs from the finished run's (its config.yaml, else its checkpoint's manifest)."""
    path = run_dir / CONFIG
    if path.exists():
        try:
            saved = identity_of(flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {}))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as err:
            raise InputError(f"{path} cannot be read ({err}); pass --overwrite to run again") from None
        refuse_changed_config(identity(cfg), saved, str(path))
        return
    directory = latest_checkpoint_dir(run_dir)
    if directory is not None:
        refuse_changed_config(identity(cfg), read_manifest(directory)["config"], f"the checkpoint in {directory}")


def regenerate(run_dir: Path, cfg: RunConfig, summary: Mapping[str, Any],
               missing: list[str]) -> tuple[list[str], list[str]]:
    """Write each missing output that can be rebuilt; ``(regenerated, not regenerable)``."""
    records = read_records(run_dir, {name: RUN_RECORDS[name] for name in ("ledger", "eval_records")},
                           at_round=int(summary["rounds"]))
    made, lacking = [], []
    for name in missing:
        if name == CURVES:
            write_curves(run_dir, summary)
        elif name == CONFIG:
            write_text_atomic(run_dir / CONFIG, config_to_yaml(cfg))
        elif records is None:
            lacking.append(name)
            continue
        elif name == COMM_LOG:
            write_text_atomic(run_dir / COMM_LOG, comm_log_text(records["ledger"]))
        else:
            write_text_atomic(run_dir / EVAL_LOG, "".join(eval_line(r, m) for r, m in records["eval_records"]))
        made.append(name)
    return made, lacking
