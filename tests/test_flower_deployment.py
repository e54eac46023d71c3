"""The Flower deployment engine on 127.0.0.1: SuperLink + 2 SuperNodes, ``flwr run`` of a generated app (slow).

* a GMFL run and a HAFL run to the end;
* a SuperNode killed (SIGKILL) mid-run: the run goes on with the other node, the log and ``summary.json`` name the
  lost client, and the restarted SuperNode (a new node id) takes part again;
* a server stopped mid-run (its ``flwr-serverapp`` killed) resumes from its checkpoint with ``resume=true``.

Each test bounds its time, keeps Flower's files in a temporary directory and stops every process it started.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from flower_deploy import Deployment, wait_for
from flower_helpers import needs_flower

from fs_gmfl.cli import main

pytestmark = [needs_flower, pytest.mark.slow]
QUICKSTART = str(Path(__file__).resolve().parent.parent / "yaml_configs" / "quickstart.yaml")

TINY_2 = ["model.type", "tiny_bert", "model.hidden_size", "16", "model.num_heads", "2", "model.vocab_size", "200",
          "data.type", "synthetic", "data.synthetic_num_samples", "120", "llm.tok_len", "16",
          "federate.client_num", "2", "federate.sample_client_num", "2", "train.local_update_steps", "2",
          "dataloader.batch_size", "8", "llm.adapter.args", "[{r: 4, lora_alpha: 8}]", "eval.freq", "1"]


def write_app(root: Path, name: str, *overrides: str) -> Path:
    app = root / name
    assert main(["flower-app", "--out", str(app), "--cfg", QUICKSTART, *TINY_2,
                 "outdir", str(root / "out"), "expname", name, *overrides]) == 0
    return app


def summary(root: Path, name: str) -> dict:
    return json.loads((root / "out" / name / "summary.json").read_text())


def evaluated_rounds(app: Path) -> int:
    """Rounds evaluated so far by the run of ``app`` (round 0 not counted)."""
    log = app.parent / "out" / app.name / "eval_results.log"
    return len(log.read_text().splitlines()) - 1 if log.exists() else 0


def start_and_wait_for_round(deployment: Deployment, app: Path, rnd: int):
    """SuperLink, one SuperNode per partition, ``flwr run`` in the background; return once round ``rnd`` is in."""
    deployment.start_superlink()
    for partition in range(deployment.partitions):
        deployment.start_node(partition)
    run = deployment.flwr_run_background(app)
    wait_for(lambda: evaluated_rounds(app) >= rnd, 300, f"round {rnd}")
    return run


def test_gmfl_and_hafl_run_to_the_end_on_a_deployment(tmp_path):
    gmfl = write_app(tmp_path, "gmfl", "federate.total_round_num", "3", "gmfl.use", "True", "gmfl.period", "1",
                     "gmfl.c", "0.5")
    hafl = write_app(tmp_path, "hafl", "federate.total_round_num", "2", "gmfl.use", "False",
                     "federate.method", "hafl", "hafl.scheme", "truncation",
                     "hafl.profiles", "[{clients: [0], rank: 2}, {clients: [1], rank: 4}]")
    with Deployment(tmp_path, partitions=2) as deployment:
        for partition in (0, 1):  # nodes first: they retry until the SuperLink is there
            deployment.start_node(partition)
        time.sleep(2)
        deployment.start_superlink()
        for app, rounds in ((gmfl, 3), (hafl, 2)):
            result = deployment.flwr_run(app, timeout=600)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
            done = summary(tmp_path, app.name)
            assert done["rounds"] == rounds and done["stopped"] is None
            assert [row["replies"] for row in done["per_round"][1:]] == [2] * rounds
            assert done["comm"]["uplink_bytes"] > 0
    assert any(row.get("frozen_fraction", 0) > 0 for row in summary(tmp_path, "gmfl")["per_round"])


def test_killed_supernode_costs_its_replies_and_rejoins_after_a_restart(tmp_path):
    # a deployed node starts a fresh client process per message (imports and model: tens of seconds on a loaded
    # 2-core machine), so the deadline leaves room for that; the SuperLink reports a dead node after ~55 s
    app = write_app(tmp_path, "fedit", "gmfl.use", "False", "federate.total_round_num", "6",
                    "flower.round_timeout_s", "120")
    with Deployment(tmp_path, partitions=2) as deployment:
        run = start_and_wait_for_round(deployment, app, 1)
        deployment.kill_node(1)
        wait_for(lambda: evaluated_rounds(app) >= 3, 300, "two more rounds")
        deployment.start_node(1)
        assert run.wait(timeout=600) == 0
    done = summary(tmp_path, "fedit")
    rows = done["per_round"][1:]
    assert done["rounds"] == 6
    lost = [row["round"] for row in rows if "1" in row.get("lost_clients", {})]
    assert lost, rows
    assert rows[-1]["replies"] == 2, f"the restarted node took part again: {rows}"
    assert all(row["replies"] >= 1 for row in rows)


def test_stopped_server_resumes_from_its_checkpoint(tmp_path):
    app = write_app(tmp_path, "resumed", "gmfl.use", "False", "federate.total_round_num", "4",
                    "federate.save_freq", "1")
    with Deployment(tmp_path, partitions=2) as deployment:
        run = start_and_wait_for_round(deployment, app, 2)
        serverapps = [pid for pid in deployment._our_pids() if b"flwr-serverapp" in
                      Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert serverapps
        for pid in serverapps:
            os.kill(pid, signal.SIGKILL)
        run.kill()  # flwr run --stream of the killed run
        run.wait(timeout=30)
        result = deployment.flwr_run(app, "resume=true", timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    done = summary(tmp_path, "resumed")
    assert done["rounds"] == 4 and [row["round"] for row in done["per_round"]] == [0, 1, 2, 3, 4]


def test_flwr_run_on_the_local_simulation_federation(tmp_path):
    """``flwr run APP`` with no federation: Flower's local simulation (2 SuperNodes by default), to the end."""
    app = write_app(tmp_path, "local", "gmfl.use", "False", "federate.total_round_num", "2")
    with Deployment(tmp_path, partitions=2) as deployment:
        (tmp_path / ".flwr" / "config.toml").unlink()  # Flower writes its default: the local simulation federation
        args = [str(Path(deployment.env["PATH"].split(os.pathsep)[0]) / "flwr"), "run", str(app), "--stream"]
        import subprocess

        result = subprocess.run(args, env=deployment.env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        (tmp_path / "flwr_run.log").write_text(result.stdout + result.stderr)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        # the log stream may end before the run does (seen under load): the run itself must finish
        finished = tmp_path / "out" / "local" / "summary.json"
        wait_for(finished.exists, 300, f"the run to finish; flwr run said: {result.stdout[-1500:]}")
    done = summary(tmp_path, "local")
    assert done["rounds"] == 2 and [row["replies"] for row in done["per_round"][1:]] == [2, 2]
