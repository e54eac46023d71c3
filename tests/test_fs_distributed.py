"""Distributed FederatedScope: one server and two clients on 127.0.0.1 over gRPC, each its own process.

Marked ``slow`` (about a minute per run on two cores) and ``fs_host`` (skipped without FederatedScope).
Ports are picked free at test time; every process is bounded by a deadline and killed in ``finally``.
"""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest

pytest.importorskip("federatedscope", reason="FederatedScope (branch llm) is not installed: FederatedScope host "
                    "tests skipped")

from fs_host_helpers import FS_CONFIGS, fs_command, fs_env, summary, system_metrics  # noqa: E402
from fs_gmfl.hosts.fs.assets import write_tiny_llm_assets  # noqa: E402

pytestmark = [pytest.mark.fs_host, pytest.mark.slow]

DEADLINE_S = 420
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


def role_opts(role: str, ports: list[int], assets: Path, out: Path) -> list[str]:
    index = ROLES.index(role)
    return ["distribute.server_port", str(ports[0]), "distribute.client_port", str(ports[index]),
            "data.root", str(assets), "model.type", f"{assets}@huggingface_llm", "outdir", str(out),
            "expname", expname(role), *(["federate.save_to", str(out / "final.ckpt")] if role == "server" else [])]


def run_distributed(tmp_path: Path, assets: Path, method_opts: list[str]) -> Path:
    """Start server then clients, wait for all (bounded), always kill leftovers; return the output directory."""
    ports, out = free_ports(3), tmp_path / "out"
    procs: dict[str, subprocess.Popen] = {}
    logs = {role: open(tmp_path / f"{role}.log", "w") for role in ROLES}
    try:
        for role in ROLES:
            cmd = fs_command("fs-run", "--cfg", str(FS_CONFIGS / "distributed" / f"{role}.yaml"),
                             *role_opts(role, ports, assets, out), *method_opts)
            procs[role] = subprocess.Popen(cmd, cwd=tmp_path, env=fs_env(), stdout=logs[role],
                                           stderr=subprocess.STDOUT)
            if role == "server":
                wait_for_port(ports[0], procs[role], timeout=180)
        end = time.monotonic() + DEADLINE_S
        codes = {role: p.wait(timeout=max(1.0, end - time.monotonic())) for role, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for fh in logs.values():
            fh.close()
    tails = {r: (tmp_path / f"{r}.log").read_text()[-3000:] for r in ROLES}
    assert codes == dict.fromkeys(ROLES, 0), f"exit codes {codes}\n" + "\n".join(f"== {r}\n{t}" for r, t in
                                                                              tails.items())
    return out


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return write_tiny_llm_assets(tmp_path_factory.mktemp("assets"))


def test_distributed_gmfl_run_completes_with_exact_bytes(tiny_llm, tmp_path):
    """FedIT + GMFL, 4 rounds over gRPC: every process exits 0; per-round bytes are the hand arithmetic; the
    server's and clients' FederatedScope monitors report the exact payload bytes each way."""
    out = run_distributed(tmp_path, tiny_llm, [])
    rows = summary(out / "server")["per_round"]
    # 2 clients x (8 LoRA tensors x 256 fp32 params + 8 B sample count); half the tensors frozen after round 2
    assert [r["uplink_bytes"] for r in rows] == [2 * 8200] * 2 + [2 * 4104] * 2
    assert [r["frozen_fraction"] for r in rows] == [0.0, 0.0, 0.5, 0.5]
    server = system_metrics(out / "server")[0]
    assert server["total_download_bytes"] == sum(r["uplink_bytes"] for r in rows)
    for role in ROLES[1:]:  # client ids follow the join order, so take each client's single row
        (client,) = system_metrics(out / expname(role)).values()
        assert client["total_upload_bytes"] == 2 * 8200 + 2 * 4104


def test_distributed_hafl_run_completes(tiny_llm, tmp_path):
    """HAFL through the same adapter over gRPC: every process exits 0 and the bytes add up each way."""
    out = run_distributed(tmp_path, tiny_llm, ["federate.method", "hafl", "gmfl.use", "False"])
    rows = summary(out / "server")["per_round"]
    assert len(rows) == 4 and all(r["uplink_bytes"] > 0 and r["rejected"] == 0 for r in rows)
    assert system_metrics(out / "server")[0]["total_download_bytes"] == sum(r["uplink_bytes"] for r in rows)
