"""How many torch threads a run uses: the CPUs this process may actually run on, never more.

torch's default intra-op thread count is the machine's core count. A process
pinned to fewer CPUs (``taskset``, ``numactl``, a Slurm or Kubernetes CPU
set) or limited by a cgroup CPU quota (``docker --cpus``) then runs more
threads than it has CPUs, and OpenMP's busy-waiting threads slow every step
(BENCHMARKS.md, "Threads"). The run's default is therefore

    min(CPUs in this process's affinity mask, ceil(cgroup CPU quota)),

and ``FS_GMFL_THREADS=N`` overrides it (an integer from 1 to 4096; a larger
value than the usable CPUs is honoured with a warning).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from fs_gmfl.config.environment import THREADS

logger = logging.getLogger(__name__)

ENV = THREADS.name
#: cgroup v2 quota file and the v1 pair (quota, period), relative to the cgroup file system root
CGROUP_V2 = "cpu.max"
CGROUP_V1 = ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.cpu_count()`` where the platform has no affinity call)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def quota_from_cgroup_v2(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line ``'<quota> <period>'``; ``None`` for ``'max ...'``."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = int(parts[0]), int(parts[1])
    return quota / period if quota > 0 and period > 0 else None


def quota_from_cgroup_v1(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: no limit)."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, or ``None`` when unlimited or unknown."""
    try:
        if (root / CGROUP_V2).is_file():
            return quota_from_cgroup_v2((root / CGROUP_V2).read_text())
        quota, period = (root / name for name in CGROUP_V1)
        if quota.is_file() and period.is_file():
            return quota_from_cgroup_v1(quota.read_text(), period.read_text())
    except (OSError, ValueError):
        return None
    return None


def usable_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """min(affinity CPUs, ceil(cgroup quota)), at least 1."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def threads_from_env(value: str | None, usable: int) -> int:
    """The thread count: ``FS_GMFL_THREADS`` when set (validated), else ``usable``.

    Raises:
        EnvironmentVariableError: the variable is set to anything but an integer from 1 to ``THREADS.high``
            (empty included).
    """
    if value is None:
        return usable
    threads = THREADS.parse(value)
    if threads > usable:
        logger.warning("%s=%d exceeds the %d CPU(s) this process may use; threads will compete for them",
                       ENV, threads, usable)
    return threads


def set_torch_threads() -> int:
    """Set torch's intra-op threads to :func:`threads_from_env` and return the count."""
    threads = threads_from_env(os.environ.get(ENV), usable_cpus())
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
