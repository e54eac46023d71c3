"""Helpers for the FederatedScope host tests: running the launcher in a subprocess, reading its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from fs_gmfl.core.adapter import adapter_key

ROOT = Path(__file__).resolve().parents[1]
FS_CONFIGS = ROOT / "yaml_configs" / "fs"


def fs_env() -> dict[str, str]:
    """Environment of a FederatedScope subprocess: offline, this checkout first on the path."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                                               os.environ.get("PYTHONPATH", "")])}


def fs_command(*args: str) -> list[str]:
    """``python -m fs_gmfl <args>`` with this interpreter."""
    return [sys.executable, "-m", "fs_gmfl", *args]


def run_fs(*args: str, cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    """Run ``fs-gmfl <args>`` (``fs-run`` / ``fs-eval``) and fail with its output tail if it fails."""
    result = subprocess.run(fs_command(*args), cwd=cwd, env=fs_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def checkpoint_adapter(path: Path) -> dict[str, torch.Tensor]:
    """A FederatedScope checkpoint ``{'cur_round', 'model'}`` as adapter tensors (peft names -> adapter keys)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {adapter_key(k): v for k, v in state.items()}


def summary(run_dir: Path) -> dict[str, Any]:
    """fs_gmfl's summary.json of a run directory."""
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def system_metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """FederatedScope's per-worker system metrics (the monitor's byte totals), by worker id."""
    rows = [json.loads(line) for line in (run_dir / "system_metrics.log").read_text().splitlines() if line.strip()]
    return {int(r["id"]): r for r in rows if isinstance(r.get("id"), int)}


def merged_like_main(cfg_file: Path, opts: list[str]) -> Any:
    """What FederatedScope's main does with `--cfg FILE KEY VALUE ...`, with the launcher's command line known."""
    from federatedscope.core.configs.config import global_cfg

    from fs_gmfl.hosts.fs.config import set_command_line

    set_command_line(str(cfg_file), opts)
    try:
        cfg = global_cfg.clone()
        cfg.merge_from_file(str(cfg_file))
        cfg.merge_from_list(opts)
        return cfg
    finally:
        set_command_line(None, None)
