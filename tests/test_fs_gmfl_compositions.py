"""GMFL wrapping HAFL, FedHFT (issue 15 item 3) and LoRA-A2 (issue 26) under FederatedScope: the same run as in the
embedded simulator.

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
                 [0.0, 0.5], id="hafl+gmfl"),
    pytest.param(["federate.method", "fedhft", "fedhft.eval", "global"], [0.0, 0.5], id="fedhft+gmfl"),
    # re-masked after every round (spec 7.4): 2 of 4 lora_B after round 1 (a2_ratio_B 0.5), 3 of 4 lora_A after
    # round 2 (0.25 + 2 * 0.25), lora_B again 2 after round 3: 0, 2, 5, 5 of 8 tensors in rounds 1-4.
    pytest.param(["federate.method", "lora_a2", "gmfl.a2_ratio_B", "0.5", "federate.total_round_num", "4"],
                 [0.0, 0.25, 0.625, 0.625], id="lora_a2+gmfl"),
]


@pytest.mark.parametrize("opts, fractions", COMPOSITIONS)
def test_gmfl_composition_gives_the_same_global_adapter_and_bytes_in_both_hosts(tmp_path: Path, opts, fractions,
                                                                                monkeypatch):
    """GMFL + HAFL / FedHFT (two rounds) and GMFL + LoRA-A2 (four) from one YAML through FederatedScope's main and
    in the simulator: the same participants, bytes and frozen fractions round by round, and the same global
    adapter."""
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
    assert [r["frozen_fraction"] for r in sim_rows] == fractions
    fs_adapter = checkpoint_adapter(tmp_path / "fs" / "final_run.ckpt")
    sim_adapter = sim.method.strategy.global_adapter()
    assert fs_adapter and set(fs_adapter) <= set(sim_adapter)
    for key, value in fs_adapter.items():
        torch.testing.assert_close(value, sim_adapter[key], rtol=0, atol=1e-6)
