"""Torch threads from the CPUs a process may use (affinity mask, cgroup quota) and the FS_GMFL_THREADS override."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.common import threads
from fs_gmfl.hosts.common.threads import (cgroup_cpu_quota, quota_from_cgroup_v1, quota_from_cgroup_v2,
                                          threads_from_env, usable_cpus)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, cpus", [("200000 100000\n", 2.0), ("150000 100000", 1.5), ("50000 100000", 0.5),
                                        ("max 100000\n", None), ("0 100000", None), ("", None)])
def test_cgroup_v2_cpu_max(text, cpus):
    assert quota_from_cgroup_v2(text) == cpus


@pytest.mark.parametrize("quota, period, cpus", [("-1", "100000", None), ("50000\n", "100000\n", 0.5),
                                                 ("300000", "100000", 3.0), ("100000", "0", None)])
def test_cgroup_v1_quota_and_period(quota, period, cpus):
    assert quota_from_cgroup_v1(quota, period) == cpus


def test_cgroup_files_v2_then_v1_then_unknown(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("100000 100000")  # v2 wins where both exist
    assert cgroup_cpu_quota(tmp_path) == 1.0
    (tmp_path / "cpu.max").write_text("garbage here")
    assert cgroup_cpu_quota(tmp_path) is None


def test_usable_cpus_is_the_smaller_of_affinity_and_rounded_up_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 8)
    assert usable_cpus(tmp_path) == 8  # no quota
    (tmp_path / "cpu.max").write_text("250000 100000")  # 2.5 CPUs
    assert usable_cpus(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("20000 100000")  # 0.2 CPUs: still one thread
    assert usable_cpus(tmp_path) == 1
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 2)
    (tmp_path / "cpu.max").write_text("400000 100000")
    assert usable_cpus(tmp_path) == 2


def test_override_honoured_and_warned_when_above_the_usable_cpus(caplog):
    assert threads_from_env(None, 2) == 2
    assert threads_from_env("1", 2) == 1
    with caplog.at_level(logging.WARNING):
        assert threads_from_env("4", 2) == 4
    assert "FS_GMFL_THREADS=4 exceeds the 2 CPU(s)" in caplog.text


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "1e3", "nan", "", "  ", "99999999999999999999",
                                   "4097"])
def test_bad_override_is_one_line_naming_the_variable(value):
    with pytest.raises(ConfigError) as info:
        threads_from_env(value, 2)
    text = str(info.value)
    assert "FS_GMFL_THREADS" in text and value in text and "positive integer" in text and "\n" not in text


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity call on this platform")
def test_a_process_pinned_to_one_cpu_runs_one_torch_thread():
    """torch alone would keep its core-count default; the run's choice follows the affinity mask."""
    code = ("import os, torch; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from fs_gmfl.hosts.common.threads import set_torch_threads; print(set_torch_threads(), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("FS_GMFL_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["1", "1"]


def test_cli_refuses_a_bad_thread_count_in_one_line(tmp_path):
    env = {**os.environ, "FS_GMFL_THREADS": "lots"}
    result = subprocess.run([sys.executable, "-m", "fs_gmfl", "run", "--cfg", str(ROOT / "yaml_configs" /
                             "quickstart.yaml"), "outdir", str(tmp_path)], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "FS_GMFL_THREADS" in line]
    assert len(lines) == 1 and "'lots'" in lines[0], result.stderr[-2000:]
    assert not list(tmp_path.rglob("summary.json"))
