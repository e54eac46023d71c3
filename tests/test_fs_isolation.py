"""Only fs_gmfl.hosts.fs may import FederatedScope; everything else works without it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fs_gmfl"
FS_IMPORT = re.compile(r"^\s*(from|import)\s+federatedscope\b", re.MULTILINE)

#: host-adapter modules that must import without FederatedScope (the rest of fs_gmfl.hosts.fs may need it).
FS_FREE_HOST_MODULES = ("fs_gmfl.hosts.fs", "fs_gmfl.hosts.fs.wire", "fs_gmfl.hosts.fs.config",
                        "fs_gmfl.hosts.fs.assets", "fs_gmfl.hosts.fs.run", "fs_gmfl.hosts.fs.evaluate")

BLOCK_FS = """
import importlib.abc, sys
class BlockFederatedScope(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "federatedscope" or name.startswith("federatedscope."):
            raise ImportError("federatedscope is blocked in this test")
sys.meta_path.insert(0, BlockFederatedScope())
"""


def test_no_module_outside_the_fs_host_imports_federatedscope():
    """grep: no `import federatedscope` / `from federatedscope` outside fs_gmfl/hosts/fs/."""
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if FS_IMPORT.search(p.read_text(encoding="utf-8"))
                 and PACKAGE / "hosts" / "fs" not in p.parents]
    assert offenders == []


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", BLOCK_FS + code], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


def test_everything_but_the_fs_adapter_works_without_federatedscope():
    """federatedscope unimportable: cores, simulator, config, CLI and the FS-free host modules import, and
    `fs-gmfl fs-run` prints one line saying how to install FederatedScope, exit code 2."""
    modules = ["fs_gmfl.core.gmfl", "fs_gmfl.core.fedavg", "fs_gmfl.core", "fs_gmfl.config", "fs_gmfl.methods",
               "fs_gmfl.hosts.sim.runner", "fs_gmfl.cli", *FS_FREE_HOST_MODULES]
    code = ("import importlib, io, contextlib\n"
            + "".join(f"importlib.import_module({m!r})\n" for m in modules)
            + "assert not any(m.startswith('federatedscope') for m in sys.modules)\n"
            + "from fs_gmfl.cli import main\n"
            + "err = io.StringIO()\n"
            + "with contextlib.redirect_stderr(err):\n    rc = main(['fs-run', '--cfg', 'x.yaml'])\n"
            + "print(rc); print(err.getvalue().strip())\n")
    result = run_blocked(code)
    assert result.returncode == 0, result.stderr[-2000:]
    rc, *lines = result.stdout.strip().splitlines()
    assert rc == "2" and len(lines) == 1
    assert lines[0].startswith("fs-gmfl: error: FederatedScope is not installed")
