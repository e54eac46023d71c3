"""A Flower deployment on 127.0.0.1 for tests: one SuperLink, one SuperNode per partition, ``flwr run``.

Everything Flower writes goes under one temporary directory (``HOME``, ``FLWR_HOME``, Ray's and the system's temp
directory), telemetry, update checks and dependency installation are off, and :meth:`Deployment.stop` kills every
process whose environment names that directory: Flower starts ``flower-superexec``, ``flwr-serverapp`` and
``flwr-clientapp`` in sessions of their own, so killing the process groups it started would miss them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    """SuperLink + SuperNodes in ``root``; a federation named ``deploy`` in ``root/.flwr/config.toml``."""

    def __init__(self, root: Path, partitions: int) -> None:
        self.root = root
        self.partitions = partitions
        # Ray puts unix sockets under its temp dir, whose paths may not exceed 107 bytes: a short directory of its own
        self.ray_dir = tempfile.mkdtemp(prefix="fsgr-", dir="/tmp")
        self.env = {**os.environ, "HOME": str(root), "FLWR_HOME": str(root / ".flwr"), "RAY_TMPDIR": self.ray_dir,
                    "TMPDIR": self.ray_dir, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FS_GMFL_THREADS": "1",
                    "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        self.port = free_port()
        self.nodes: dict[int, subprocess.Popen] = {}
        self.superlink: subprocess.Popen | None = None
        (root / ".flwr").mkdir(parents=True, exist_ok=True)
        (root / ".flwr" / "config.toml").write_text(
            '[superlink]\ndefault = "deploy"\n\n'
            f'[superlink.deploy]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n', encoding="utf-8")

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        return subprocess.Popen([str(VENV_BIN / args[0]), *args[1:]], env=self.env, cwd=self.root, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_superlink(self, timeout: float = 120) -> None:
        """Start the SuperLink and wait until its port accepts connections."""
        self.superlink = self._spawn("superlink", "flower-superlink", "--insecure", "--port", str(self.port))

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, timeout, f"the SuperLink on port {self.port}")

    def start_node(self, partition: int) -> None:
        self.nodes[partition] = self._spawn(
            f"supernode{partition}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(free_port()), "--node-config",
            f"partition-id={partition} num-partitions={self.partitions}")

    def kill_node(self, partition: int) -> None:
        """SIGKILL the SuperNode of ``partition`` and the ClientApp processes it started."""
        node = self.nodes.pop(partition)
        children = [pid for pid in self._our_pids() if self._parent(pid) == node.pid]
        for pid in [node.pid, *children]:
            _kill(pid)
        node.wait(timeout=30)

    def flwr_run(self, app: Path, *run_config: str, timeout: float = 600) -> subprocess.CompletedProcess:
        args = [str(VENV_BIN / "flwr"), "run", str(app), "deploy", "--stream"]
        for item in run_config:
            args += ["--run-config", item]
        return subprocess.run(args, env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout)

    def flwr_run_background(self, app: Path, *run_config: str) -> subprocess.Popen:
        args = ["flwr", "run", str(app), "deploy", "--stream"]
        for item in run_config:
            args += ["--run-config", item]
        return self._spawn("flwr_run", *args)

    def _our_pids(self) -> list[int]:
        marker = f"FLWR_HOME={self.root / '.flwr'}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    @staticmethod
    def _parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return -1

    def stop(self) -> None:
        """Kill every process this deployment started (by their environment), wait for the ones we hold."""
        for _ in range(3):
            pids = self._our_pids()
            if not pids:
                break
            for pid in pids:
                _kill(pid)
            time.sleep(0.5)
        for proc in [self.superlink, *self.nodes.values()]:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    pass
        shutil.rmtree(self.ray_dir, ignore_errors=True)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
