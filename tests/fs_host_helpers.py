"""Helpers for the FederatedScope host tests: running the launcher in a subprocess, reading its outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import closing
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


# -- distributed (gRPC) runs: one process per role on 127.0.0.1 ---------------------------------------------------
ROLES = ("server", "client_1", "client_2")


def expname(role: str) -> str:
    """Run name of a role (FederatedScope reads any override token starting with 'client' as a client-config key)."""
    return role.replace("client_", "worker_")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    """Block until the server listens on ``port`` (or fail if it exits or the time runs out)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert process.poll() is None, "server exited before listening"
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"server did not listen on port {port} within {timeout} s")


def role_opts(role: str, ports: list[int], data_root: Path, model_dir: Path, out: Path) -> list[str]:
    """Per-process overrides: ports, local data and model, outputs (the server also saves the final adapter)."""
    index = ROLES.index(role)
    return ["distribute.server_port", str(ports[0]), "distribute.client_port", str(ports[index]),
            "data.root", str(data_root), "model.type", f"{model_dir}@huggingface_llm", "outdir", str(out),
            "expname", expname(role), *(["federate.save_to", str(out / "final.ckpt")] if role == "server" else [])]
