"""Method state in FederatedScope checkpoints: `federate.save_to` stores the strategy's state beside the model and
`federate.restore_from` resumes it, so 2 rounds + restore + 2 rounds equal 4 rounds bit for bit.

Skipped (with the reason shown) when FederatedScope is not importable; see docs/federatedscope.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("federatedscope", reason="FederatedScope (branch llm) is not installed: FederatedScope host "
                    "tests skipped")

from fs_host_helpers import FS_CONFIGS, checkpoint_adapter, run_fs, summary  # noqa: E402
from fs_gmfl.hosts.fs.method_state import load_method_state, state_path  # noqa: E402

pytestmark = pytest.mark.fs_host

BOTH_HOSTS = FS_CONFIGS / "gmfl_fedit_tiny_bert_both_hosts.yaml"
ROW_KEYS = ("round", "clients", "uplink_bytes", "downlink_bytes", "frozen_fraction", "log_entries", "log_bytes")


def run(tmp_path: Path, name: str, rounds: int, method_opts: list[str], *extra: str) -> Path:
    out = tmp_path / name
    run_fs("fs-run", "--cfg", str(BOTH_HOSTS), *method_opts, "federate.total_round_num", str(rounds),
           "outdir", str(out), "expname", "run", "federate.save_to", str(out / "run.ckpt"), *extra, cwd=tmp_path)
    return out


def assert_same_state(a: Any, b: Any, path: str = "state") -> None:
    """Nested strategy states are equal: tensors bit for bit (dtype included), everything else by value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}/{i}")
    else:
        assert a == b, path


def check_resume(tmp_path: Path, method_opts: list[str], method: str) -> None:
    # Prepare / Execute: 4 rounds straight; 2 rounds, then a new process restoring them for rounds 3-4
    straight = run(tmp_path, "straight", 4, method_opts)
    first = run(tmp_path, "first", 2, method_opts)
    resumed = run(tmp_path, "resumed", 4, method_opts, "federate.restore_from", str(first / "final_run.ckpt"))
    # Assert
    assert state_path(first / "final_run.ckpt").is_file()
    expected, got = checkpoint_adapter(straight / "final_run.ckpt"), checkpoint_adapter(resumed / "final_run.ckpt")
    assert set(expected) == set(got) and all(torch.equal(expected[k], got[k]) for k in expected)
    rnd_a, state_a = load_method_state(straight / "final_run.ckpt", method=method)
    rnd_b, state_b = load_method_state(resumed / "final_run.ckpt", method=method)
    assert rnd_a == rnd_b == 4
    assert_same_state(state_a, state_b)
    rows_straight = [{k: r[k] for k in ROW_KEYS if k in r} for r in summary(straight / "run")["per_round"]]
    rows_resumed = [{k: r[k] for k in ROW_KEYS if k in r} for r in summary(resumed / "run")["per_round"]]
    assert rows_resumed == rows_straight[2:]  # the resumed process ran rounds 3 and 4, with the same traffic


def test_gmfl_resumes_with_its_masks(tmp_path):
    """FedIT + GMFL (masks refreshed every round from the second on): the restored mask state continues."""
    check_resume(tmp_path, ["federate.method", "fedit"], "fedit+gmfl")


@pytest.mark.slow
@pytest.mark.parametrize("method_opts, method", [
    (["federate.method", "hafl", "gmfl.use", "False"], "hafl-freezing-adaptive"),
    (["federate.method", "fedhft", "gmfl.use", "False"], "fedhft"),
], ids=["hafl", "fedhft"])
def test_other_methods_resume_with_their_state(tmp_path, method_opts, method):
    """HAFL (importance EMAs) and FedHFT (cluster heads, memberships) resume bit for bit too."""
    check_resume(tmp_path, method_opts, method)


def test_fedkrso_resumes_with_its_weights_and_catchup_log(tmp_path):
    """FedKRSO: the checkpoint holds the global targeted weights and head, the method state their fp32 master,
    the version, each client's sync version and the catch-up log; round 3's downlinks replay round 2 (not a full
    sync) and the resumed run ends with the same weights, state and bytes as 4 rounds straight."""
    opts = ["federate.method", "fedkrso", "gmfl.use", "False", "fedkrso.interval", "2", "fedkrso.num_seeds", "3"]
    check_resume(tmp_path, opts, "fedkrso")
    rnd, state = load_method_state(tmp_path / "first" / "final_run.ckpt", method="fedkrso")
    assert rnd == state["version"] == 2 and state["client_version"] == {0: 1, 1: 1, 2: 1}
    saved = checkpoint_adapter(tmp_path / "first" / "final_run.ckpt")
    assert set(saved) == set(state["weights"]) | set(state["head"]) and len(state["weights"]) == 12
    assert all(torch.equal(saved[k], v) for k, v in {**state["weights"], **state["head"]}.items())
