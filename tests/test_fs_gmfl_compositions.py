"""GMFL wrapping HAFL and FedHFT under FederatedScope: the same run as in the embedded simulator (issue 15 item 3).

Skipped (with the reason shown) when FederatedScope is not importable; see docs/federatedscope.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("federatedscope", reason="FederatedScope (branch llm) is not installed: FederatedScope host "
                    "tests skipped")

from fs_host_helpers import FS_CONFIGS, checkpoint_adapter, run_fs, summary  # noqa: E402

from fs_gmfl.config import load_config  # noqa: E402
from fs_gmfl.hosts.sim.runner import Simulation  # noqa: E402

pytestmark = pytest.mark.fs_host

#: FedIT + GMFL, 3 clients, 2 rounds, period 1 (c = beta = 0.25: 2 of 4 modules frozen in round 2).
BOTH_HOSTS = FS_CONFIGS / "gmfl_fedit_tiny_bert_both_hosts.yaml"
BYTE_KEYS = ("uplink_bytes", "uplink_payload_bytes", "uplink_control_bytes", "downlink_bytes",
             "downlink_payload_bytes", "downlink_control_bytes", "frozen_fraction", "frozen_numel_fraction")
COMPOSITIONS = [
    pytest.param(["federate.method", "hafl", "hafl.scheme", "freezing", "hafl.train_head", "True", "hafl.profiles",
                  "[{'share': 0.34, 'freeze_ratio': 0.5}, {'share': 0.66, 'freeze_ratio': 0.0}]"],
                 id="hafl+gmfl"),
    pytest.param(["federate.method", "fedhft", "fedhft.eval", "global"], id="fedhft+gmfl"),
]


@pytest.mark.parametrize("opts", COMPOSITIONS)
def test_gmfl_composition_gives_the_same_global_adapter_and_bytes_in_both_hosts(tmp_path: Path, opts, monkeypatch):
    """Two rounds of GMFL + HAFL / FedHFT from one YAML through FederatedScope's main and in the simulator: the
    same participants, bytes and frozen fractions (0, then 0.5) round by round, and the same global adapter."""
    # Prepare
    monkeypatch.setenv("FS_GMFL_THREADS", "1")
    fs_opts = [*opts, "outdir", str(tmp_path / "fs"), "expname", "run", "federate.save_to",
               str(tmp_path / "fs" / "run.ckpt")]
    # Execute
    run_fs("fs-run", "--cfg", str(BOTH_HOSTS), *fs_opts, cwd=tmp_path)
    sim = Simulation(load_config(BOTH_HOSTS, [*opts, "outdir", str(tmp_path / "sim"), "expname", "run"]),
                     quiet=True)
    sim_summary = sim.run()
    # Assert
    fs_rows, sim_rows = summary(tmp_path / "fs" / "run")["per_round"], sim_summary["per_round"][1:]
    keys = ["clients", *BYTE_KEYS]
    assert [{k: r[k] for k in keys} for r in fs_rows] == [{k: r[k] for k in keys} for r in sim_rows]
    assert [r["frozen_fraction"] for r in sim_rows] == [0.0, 0.5]
    fs_adapter = checkpoint_adapter(tmp_path / "fs" / "final_run.ckpt")
    sim_adapter = sim.method.strategy.global_adapter()
    assert fs_adapter and set(fs_adapter) <= set(sim_adapter)
    for key, value in fs_adapter.items():
        torch.testing.assert_close(value, sim_adapter[key], rtol=0, atol=1e-6)
