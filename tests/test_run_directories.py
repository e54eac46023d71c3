"""Run directories: never shared, never overwritten silently, finished by --resume, interrupted cleanly, valid JSON.

Issue #14, scope item 5. Runs are the tiny synthetic configuration of ``tests/test_bad_input_table.py``.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path

import pytest

from fs_gmfl.hosts.common.rundir import dumps_strict, json_safe, write_json_atomic, write_text_atomic
from fs_gmfl.hosts.sim import outputs, runner
from tests.test_bad_input_table import BASE, run_cli

pytestmark = pytest.mark.usefixtures("single_thread")


def strict_json(text: str) -> object:
    """Parse JSON refusing ``NaN``/``Infinity`` tokens."""
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def run_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["run", "--cfg", "/dev/null", *BASE, "outdir", str(tmp_path), "expname", "r", *extra]


def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path, capsys):
    """Second run into a finished directory: one line naming --overwrite, every output byte unchanged."""
    assert run_cli(run_args(tmp_path, "--quiet"), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    code, lines = run_cli(run_args(tmp_path, "train.local_update_steps", "2", "--quiet"), capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "already holds a finished run" in lines[0] and "--overwrite" in lines[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before


def test_overwrite_replaces_a_finished_run_but_a_refused_config_loses_nothing(tmp_path, capsys):
    """--overwrite with a bad configuration keeps the old summary; with a good one it writes the new run."""
    assert run_cli(run_args(tmp_path, "--quiet"), capsys)[0] == 0
    old = (tmp_path / "r" / "summary.json").read_bytes()
    code, lines = run_cli(run_args(tmp_path, "model.num_labels", "1", "--overwrite", "--quiet"), capsys)
    assert code == 2 and "model.num_labels" in lines[-1]
    assert (tmp_path / "r" / "summary.json").read_bytes() == old
    code, _ = run_cli(run_args(tmp_path, "federate.total_round_num", "2", "--overwrite", "--quiet"), capsys)
    assert code == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["rounds"] == 2


def test_a_locked_run_directory_is_refused_and_left_alone(tmp_path, capsys):
    """While another process holds ``<run_dir>/.lock``, a run there is refused naming its pid and writes nothing."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("theirs\n", encoding="utf-8")
    with open(run_dir / ".lock", "a+", encoding="utf-8") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("424242\n")
        held.flush()
        # the lock is per open file description: a second open() in this process conflicts like another process
        code, lines = run_cli(run_args(tmp_path, "--quiet"), capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "is in use by another run (pid 424242)" in lines[0]
    assert (run_dir / "config.yaml").read_text(encoding="utf-8") == "theirs\n"
    assert not (run_dir / "eval_results.log").exists()


def test_the_lock_is_released_after_a_run_and_after_a_refusal(tmp_path, capsys):
    """After a finished run and after a refused one, the lock can be taken again at once."""
    assert run_cli(run_args(tmp_path, "--quiet"), capsys)[0] == 0
    assert run_cli(run_args(tmp_path, "--quiet"), capsys)[0] == 2
    with open(tmp_path / "r" / ".lock", "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anything still held it


def test_resume_finishes_a_run_killed_between_its_last_checkpoint_and_its_outputs(tmp_path, capsys):
    """SIGKILL after the last checkpoint (outputs missing): the README's ``... --resume`` writes them, same results."""
    args = run_args(tmp_path, "federate.total_round_num", "2", "federate.save_freq", "1", "--quiet")
    assert run_cli(args, capsys)[0] == 0
    original = json.loads((tmp_path / "r" / "summary.json").read_text())
    comm_log = (tmp_path / "r" / "comm_log.jsonl").read_text()
    for name in ("summary.json", "comm_log.jsonl", "curves.png"):  # what a kill before RunWriter.finish leaves out
        (tmp_path / "r" / name).unlink()
    code, lines = run_cli(["run", "--cfg", "/dev/null", *BASE, "outdir", str(tmp_path), "expname", "r",
                           "federate.total_round_num", "2", "federate.save_freq", "1", "--resume", "--quiet"], capsys)
    assert code == 0, lines
    resumed = json.loads((tmp_path / "r" / "summary.json").read_text())
    drop = {"median_step_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed["per_round"]] == \
           [{k: v for k, v in r.items() if k not in drop} for r in original["per_round"]]
    assert resumed["final"] == original["final"] and resumed["comm"] == original["comm"]
    assert (tmp_path / "r" / "comm_log.jsonl").read_text() == comm_log
    assert (tmp_path / "r" / "curves.png").exists()
    code, lines = run_cli(args[:-1] + ["--resume", "--quiet"], capsys)  # now finished: resuming is refused
    assert code == 2 and "federate.total_round_num" in lines[0]


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every output file of a run directory (not the lock, the client state or the checkpoint) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file() and p.name != ".lock"}


def test_resume_of_a_finished_run_regenerates_a_missing_plot_and_changes_nothing_else(tmp_path, capsys):
    """Killed after summary.json but before curves.png: ``--resume`` draws the plot again, says so in one line and
    exits 0; every other file keeps its bytes. An output only a checkpoint could rebuild is named, exit 2."""
    args = run_args(tmp_path, "federate.total_round_num", "2", "--quiet")
    assert run_cli(args, capsys)[0] == 0
    run_dir = tmp_path / "r"
    before = files_of(run_dir)
    (run_dir / "curves.png").unlink()
    code, lines = run_cli(args + ["--resume"], capsys)
    assert code == 0 and len(lines) == 1, lines
    assert lines[0] == f"fs-gmfl: {run_dir} holds a finished run of 2 rounds; regenerated its missing curves.png"
    after = files_of(run_dir)
    assert set(after) == set(before)
    assert {k: v for k, v in after.items() if k != "curves.png"} == {k: v for k, v in before.items()
                                                                      if k != "curves.png"}
    (run_dir / "comm_log.jsonl").unlink()
    code, lines = run_cli(args + ["--resume"], capsys)
    assert code == 2 and len(lines) == 1 and "lacks comm_log.jsonl (only a checkpoint of round 2" in lines[0], lines
    assert files_of(run_dir) == {k: v for k, v in after.items() if k != "comm_log.jsonl"}


def test_resume_of_a_finished_run_rebuilds_its_logs_from_the_last_checkpoint(tmp_path, capsys):
    """With a checkpoint of the last round, a lost comm_log.jsonl, eval_results.log and config.yaml come back with
    their exact bytes; a changed configuration is refused first (naming the key), and changes nothing."""
    args = run_args(tmp_path, "federate.total_round_num", "2", "federate.save_freq", "1", "--quiet")
    assert run_cli(args, capsys)[0] == 0
    run_dir = tmp_path / "r"
    before = files_of(run_dir)
    lost = ("config.yaml", "eval_results.log", "comm_log.jsonl")
    for name in lost:
        (run_dir / name).unlink()
    code, lines = run_cli(args + ["--resume", "train.optimizer.lr", "0.5"], capsys)
    assert code == 2 and len(lines) == 1 and "'train.optimizer.lr' = 0.5" in lines[0], lines
    assert not any((run_dir / name).exists() for name in lost)
    code, lines = run_cli(args + ["--resume"], capsys)
    assert code == 0 and len(lines) == 1 and lines[0].endswith(f"regenerated its missing {', '.join(lost)}")
    assert files_of(run_dir) == before


@pytest.mark.parametrize("where", ["setup", "after_rounds"])
def test_sigterm_at_any_moment_ends_with_130_and_a_message(where, tmp_path, capsys, monkeypatch):
    """A real SIGTERM during set-up or after the round loop (while writing outputs): status 130 and one message."""
    def sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    if where == "setup":
        monkeypatch.setattr(runner, "check_data", lambda *a: sigterm())
    else:
        monkeypatch.setattr(outputs, "write_json_atomic", sigterm)  # killed just before summary.json
    args = run_args(tmp_path, "federate.save_freq", "1", "--quiet")
    handler_before = signal.getsignal(signal.SIGTERM)
    code, lines = run_cli(args, capsys)
    assert signal.getsignal(signal.SIGTERM) == handler_before  # restored after the run
    assert code == 130
    assert len(lines) == 1 and lines[0].startswith("fs-gmfl: interrupted"), lines
    if where == "setup":
        assert "no checkpoint was written" in lines[0]
    else:
        assert "the checkpoint of round 1" in lines[0] and "--resume" in lines[0]
        monkeypatch.undo()
        assert run_cli(args + ["--resume"], capsys)[0] == 0  # the printed advice finishes the run
        assert strict_json((tmp_path / "r" / "summary.json").read_text())["rounds"] == 1


def test_outputs_are_strict_json_even_with_non_finite_metrics(tmp_path, capsys, monkeypatch):
    """A NaN loss and an infinite metric become null in summary.json and eval_results.log (no NaN/Infinity tokens)."""
    real = runner.Simulation.evaluate_global

    def with_non_finite(self):
        return {**real(self), "test_loss": float("nan"), "test_acc": float("inf")}

    monkeypatch.setattr(runner.Simulation, "evaluate_global", with_non_finite)
    assert run_cli(run_args(tmp_path, "--quiet"), capsys)[0] == 0
    summary = strict_json((tmp_path / "r" / "summary.json").read_text())
    assert summary["final"]["test_loss"] is None and summary["final"]["test_acc"] is None
    for line in (tmp_path / "r" / "eval_results.log").read_text().splitlines():
        assert strict_json(line)["Results_raw"]["test_loss"] is None
    for line in (tmp_path / "r" / "comm_log.jsonl").read_text().splitlines():
        strict_json(line)


def test_json_safe_and_atomic_writes(tmp_path):
    """Non-finite floats at any depth become None; a failed atomic write leaves the old file and no temporary."""
    assert json_safe({"a": [1.0, float("nan"), {"b": float("-inf")}], "c": (2, float("inf"))}) == \
        {"a": [1.0, None, {"b": None}], "c": [2, None]}
    assert dumps_strict({"x": float("nan")}) == '{"x": null}'
    path = tmp_path / "s.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]
    write_text_atomic(path, "replaced")
    assert path.read_text() == "replaced"


def test_an_empty_evaluation_split_with_another_to_report_is_a_warning_in_the_summary(tmp_path, capsys):
    """``data.splits`` leaving test empty while val is evaluated: the run ends, summary.json lists the warning."""
    code, lines = run_cli(run_args(tmp_path, "data.splits", "[0.8, 0.2, 0.0]", "eval.split", "[val, test]",
                                   "--quiet"), capsys)
    assert code == 0, lines
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["warnings"] == ["data.splits = [0.8, 0.2, 0.0] gives 'test' no examples; eval.split ['test'] "
                                   "is skipped"]
    assert set(summary["final"]) == {"val_acc", "val_loss"}


def test_a_refused_run_leaves_no_directory_behind(tmp_path, capsys):
    """A configuration refused after the lock was taken removes the run directory it created."""
    code, _ = run_cli(run_args(tmp_path, "model.num_labels", "1", "--quiet"), capsys)
    assert code == 2
    assert not (tmp_path / "r").exists()


def test_a_run_directory_locked_by_another_process_is_refused(tmp_path, capsys):
    """Another (real) process holding the lock: the run is refused naming that process's pid."""
    import subprocess
    import sys

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         f"fh = open({str(run_dir / '.lock')!r}, 'a+')\n"
         "fcntl.flock(fh, fcntl.LOCK_EX)\nfh.truncate(0); fh.write(f'{os.getpid()}\\n'); fh.flush()\n"
         "print('locked', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, lines = run_cli(run_args(tmp_path, "--quiet"), capsys)
    finally:
        holder.communicate("", timeout=30)
    assert code == 2 and len(lines) == 1, lines
    assert f"is in use by another run (pid {holder.pid})" in lines[0]
    assert run_cli(run_args(tmp_path, "--quiet"), capsys)[0] == 0  # free once the holder has exited
