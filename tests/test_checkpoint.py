"""Checkpoint and resume of simulator runs: identical results, atomic saves, refusal of bad checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from method_cases import registered_cases  # noqa: E402

from fs_gmfl.cli import main
from fs_gmfl.hosts.common.state_tree import flatten_state, unflatten_state
from fs_gmfl.hosts.sim import checkpoint as ckpt_mod
from fs_gmfl.hosts.sim.checkpoint import latest_checkpoint_dir
from fs_gmfl.hosts.sim.runner import Simulation

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = registered_cases(
    adjust={
        "fedit": ["faults.dropout_before", "0.3", "faults.straggler_fraction", "0.5", "faults.straggler_delay", "2",
                  "faults.deadline", "2"],
        "hafl": ["hafl.scheme", "truncation",
                 "hafl.profiles", "[{clients: [0, 1], rank: 1}, {clients: [2, 3], rank: 4}]"],
        "fedkrso": ["fedkrso.num_seeds", "2", "fedkrso.interval", "2"],
        "fedhft": ["fedhft.eval", "personalised", "data.client_val_fraction", "0.25"],
    },
    variants={"gmfl": ["gmfl.use", "True", "gmfl.c", "0.5", "gmfl.period", "1", "gmfl.downlink", "stateful_sync"]})
#: per-round keys that measure time, not results.
TIMING_KEYS = {"median_step_seconds", "train_seconds", "eval_seconds"}


def comparable(summary: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in summary["per_round"]]


def final_state(sim: Simulation) -> dict[str, torch.Tensor]:
    return sim.method.strategy.global_adapter()


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_from_round_2_equals_an_uninterrupted_run(tiny, method):
    """2 rounds, stop, resume to 4 == 4 rounds straight: same global adapter bit for bit, same per-round records."""
    # Prepare
    overrides = [*METHODS[method], "federate.save_freq", "1"]
    straight = Simulation(tiny(*overrides, "expname", "straight"), quiet=True)
    first = Simulation(tiny(*overrides, "expname", "resumed", "federate.total_round_num", "2"), quiet=True)
    # Execute
    expected = straight.run()
    first.run()
    resumed = Simulation(tiny(*overrides, "expname", "resumed"), quiet=True, resume=True)
    ran: list[int] = []
    run_round = resumed.run_round
    resumed.run_round = lambda rnd: ran.append(rnd) or run_round(rnd)
    got = resumed.run()
    # Assert
    assert ran == [3, 4] and resumed.checkpoint.round == 2
    want, have = final_state(straight), final_state(resumed)
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want)
    assert comparable(got) == comparable(expected)
    assert got["comm"] == expected["comm"] and got["final"] == expected["final"]
    assert got["faults"] == expected["faults"] and got["timing"]["local_steps"] == expected["timing"]["local_steps"]
    log = (Path(resumed.run_dir) / "eval_results.log").read_text().splitlines()
    assert [json.loads(line)["Round"] for line in log] == [0, 2, 4]
    assert (Path(resumed.run_dir) / "comm_log.jsonl").read_text() == (Path(straight.run_dir) / "comm_log.jsonl"
                                                                       ).read_text()


def test_flatten_round_trip_keeps_key_types_tuples_and_scalars():
    """Nested strategy state survives flattening: int keys stay int, tuples stay tuples, tensors are equal."""
    state = {"global": {"a.lora_A.weight": torch.arange(6.0).view(2, 3)}, "changed_at": {"a": 3},
             "pending": {2: torch.tensor([1, 0], dtype=torch.int8)}, "levels": (1, 2.5), "masking": None,
             "flags": [True, False]}
    tree, tensors = flatten_state(state)
    back = unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert back.keys() == state.keys() and back["changed_at"] == {"a": 3} and back["levels"] == (1, 2.5)
    assert list(back["pending"]) == [2] and torch.equal(back["pending"][2], state["pending"][2])
    assert torch.equal(back["global"]["a.lora_A.weight"], state["global"]["a.lora_A.weight"])
    assert back["masking"] is None and back["flags"] == [True, False]


def test_interrupted_save_keeps_the_previous_checkpoint(tiny, monkeypatch):
    """A crash while round 3's checkpoint is written leaves LATEST on round 2's complete checkpoint."""
    # Prepare
    cfg = tiny("federate.save_freq", "1")
    sim = Simulation(cfg, quiet=True)
    real_save = ckpt_mod.save_file

    def save_file(tensors, path):
        if "round_000003" in path:
            raise KeyboardInterrupt
        real_save(tensors, path)

    monkeypatch.setattr(ckpt_mod, "save_file", save_file)
    # Execute
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    # Assert
    assert sim.saved_round == 2
    assert latest_checkpoint_dir(sim.run_dir).name == "round_000002"
    monkeypatch.undo()
    assert Simulation(cfg, quiet=True, resume=True).run()["rounds"] == 4
    assert sorted(p.name for p in (sim.run_dir / "checkpoint").iterdir()) == ["LATEST", "round_000004"]


@pytest.fixture
def saved_run(tmp_path):
    """A finished 2-round run with checkpoints (CLI arguments without the --cfg file's keys)."""
    from tests.conftest import TINY

    cfg = tmp_path / "run.yaml"
    cfg.write_text("federate:\n  save_freq: 1\n", encoding="utf-8")
    args = [str(cfg), *TINY, "outdir", str(tmp_path), "expname", "x", "federate.total_round_num", "2"]
    assert main(["run", "--quiet", "--cfg", *args]) == 0
    return args, tmp_path / "x" / "checkpoint" / "round_000002"


@pytest.mark.parametrize("damage", ["manifest", "truncated", "config", "finished"])
def test_damaged_or_mismatched_checkpoint_is_refused_with_one_line(saved_run, capsys, damage):
    """Corrupt manifest, truncated state, changed configuration, nothing left to run: exit 2, one line naming why."""
    # Prepare
    args, directory = saved_run
    extra = ["federate.total_round_num", "3"]
    if damage == "manifest":
        (directory / "manifest.json").write_text("{not json", encoding="utf-8")
    elif damage == "truncated":
        data = (directory / "state.safetensors").read_bytes()
        (directory / "state.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "config":
        extra += ["train.optimizer.lr", "0.5"]
    else:
        extra = []
    capsys.readouterr()
    # Execute
    code = main(["run", "--quiet", "--resume", "--cfg", *args, *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    # Assert
    assert code == 2 and len(err) == 1
    expected = {"manifest": "corrupt checkpoint", "truncated": "SHA-256 does not match",
                "config": "config key 'train.optimizer.lr' = 0.5",
                "finished": "config key 'federate.total_round_num' = 2 is not allowed: more than the 2 rounds"}[damage]
    assert expected in err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-round tiny run that checkpointed every round (run once; tests copy it)."""
    from tests.conftest import TINY

    outdir = tmp_path_factory.mktemp("finished")
    args = [*TINY, "expname", "x", "federate.total_round_num", "2", "federate.save_freq", "1"]
    assert main(["run", "--quiet", "--cfg", "/dev/null", *args, "outdir", str(outdir)]) == 0
    return args, outdir


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` (but the lock, which holds the pid of the last process) with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


#: damage to round 2's manifest -> fragment of the message (after the manifest's path).
MANIFEST_DAMAGE = {
    "ledger_missing": (lambda m: m.pop("ledger"), "field ledger missing"),
    "records_missing": (lambda m: [m.pop(k) for k in ("step_seconds", "eval_records")],
                        "fields step_seconds, eval_records missing"),
    "strategy_tree_missing": (lambda m: m.pop("strategy_tree"), "field strategy_tree missing"),
    "config_missing": (lambda m: m.pop("config"), "field config missing"),
    "per_round_not_a_list": (lambda m: m.update(per_round="rows"), "field 'per_round' is malformed"),
    "ledger_row_without_bytes": (lambda m: m["ledger"][0].pop("payload_bytes"), "field 'ledger' is malformed"),
    "rng_truncated": (lambda m: m.update(torch_rng=m["torch_rng"][:100]), "field 'torch_rng' is not torch's RNG"),
    "rng_byte_out_of_range": (lambda m: m["torch_rng"].__setitem__(0, 300), "field 'torch_rng' is not torch's RNG"),
    "rng_invalid_state": (lambda m: m.update(torch_rng=[0] * len(m["torch_rng"])),
                          "field 'torch_rng' is not a valid RNG state"),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_a_manifest_missing_a_field_or_with_a_corrupt_rng_state_is_refused_and_left_intact(finished_run, damage,
                                                                                           tmp_path, capsys):
    """Resume with a manifest that lacks a field or holds a broken RNG state: exit 2, one line naming the manifest
    and what is wrong, and the run directory (checkpoint included) keeps every byte."""
    # Prepare
    args, outdir = finished_run
    shutil.copytree(outdir / "x", tmp_path / "x")
    manifest_path = latest_checkpoint_dir(tmp_path / "x") / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    edit, fragment = MANIFEST_DAMAGE[damage]
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    before = snapshot(tmp_path / "x")
    capsys.readouterr()
    # Execute: three rounds, so the finished two-round run is continued from its checkpoint
    code = main(["run", "--quiet", "--resume", "--cfg", "/dev/null", *args, "outdir", str(tmp_path),
                 "federate.total_round_num", "3"])
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    # Assert
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"fs-gmfl: error: corrupt checkpoint {manifest_path}: {fragment}"), err
    assert snapshot(tmp_path / "x") == before


def test_sigterm_keeps_checkpoint_and_prints_resume_command(tmp_path):
    """A run killed by SIGTERM after round 2 exits 130, prints the resume command, and resuming finishes it."""
    # Prepare
    from tests.conftest import TINY

    cfg = tmp_path / "run.yaml"
    cfg.write_text("federate:\n  save_freq: 1\n", encoding="utf-8")
    args = ["--cfg", str(cfg), *TINY, "outdir", str(tmp_path), "expname", "k"]
    script = ("import os, signal, sys\n"
              "from fs_gmfl.hosts.sim import runner\n"
              "save = runner.Simulation.save\n"
              "def save_then_die(self, rnd, per_round):\n"
              "    save(self, rnd, per_round)\n"
              "    if rnd == 2:\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "runner.Simulation.save = save_then_die\n"
              "from fs_gmfl.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = {**__import__("os").environ, "FS_GMFL_THREADS": "1"}
    # Execute
    proc = subprocess.run([sys.executable, "-c", script, "run", "--quiet", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    # Assert
    assert proc.returncode == 130, proc.stderr
    assert "the checkpoint of round 2" in proc.stderr and "--resume" in proc.stderr
    assert latest_checkpoint_dir(tmp_path / "k").name == "round_000002"
    assert main(["run", "--quiet", "--resume", *args]) == 0
    summary = json.loads((tmp_path / "k" / "summary.json").read_text())
    assert [row["round"] for row in summary["per_round"]] == [0, 1, 2, 3, 4]
