"""Running several configurations on one Flower simulation (one Ray start-up for a whole table of cases).

Flower's simulation engine takes seconds to start (Ray, one actor per parallel client, each importing torch);
a table of ten methods would pay that ten times. :func:`simulate_many` runs the configurations one after another
inside one ServerApp on the same virtual nodes: every configuration must have the same ``federate.client_num``.
Each run is a full :class:`~fs_gmfl.hosts.flower.server.FlowerRun` (its own run directory, its own client runtime:
a node's state is kept per configuration digest), so the runs do not see each other.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import pytest

from fs_gmfl.config.schema import RunConfig

try:
    import flwr  # noqa: F401

    HAVE_FLOWER = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_FLOWER = False

needs_flower = pytest.mark.skipif(not HAVE_FLOWER, reason="Flower is not installed (bash scripts/install.sh --flower "
                                  "installs flwr[simulation]==1.42.0)")


def flower_environment(tmp: str) -> dict[str, str]:
    """Environment for Flower that writes nothing outside ``tmp`` and calls no one."""
    return {"HOME": tmp, "FLWR_HOME": os.path.join(tmp, ".flwr"), "RAY_TMPDIR": tmp, "TMPDIR": tmp,
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def simulate_many(configs: Sequence[RunConfig], *, client_app: Any = None, parallel: int = 2) -> list[Any]:
    """Run ``configs`` in turn on one Flower simulation; each one's :class:`~fs_gmfl.hosts.flower.app.Outcome`."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fs_gmfl.hosts.flower.app import Outcome, backend_config
    from fs_gmfl.hosts.flower.client import make_client_app
    from fs_gmfl.hosts.flower.server import FlowerRun

    nums = {cfg.federate.client_num for cfg in configs}
    assert len(nums) == 1, f"one client_num for all configurations, got {nums}"
    outcomes = [Outcome() for _ in configs]
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        for cfg, outcome in zip(configs, outcomes):
            outcome.run = FlowerRun(cfg, grid, quiet=True)
            try:
                outcome.summary = outcome.run.run()
            except Exception as err:  # noqa: BLE001 - reported by the test
                outcome.error = err

    backend = backend_config(configs[0])
    backend["init_args"]["num_cpus"] = parallel
    tmp = tempfile.mkdtemp(prefix="fs-gmfl-ray-")
    backend["init_args"]["_temp_dir"] = tmp
    saved = {k: os.environ.get(k) for k in flower_environment(tmp)}
    os.environ.update({k: v for k, v in flower_environment(tmp).items() if k not in ("HOME", "TMPDIR")})
    try:
        run_simulation(server_app=app, client_app=client_app or make_client_app(), num_supernodes=nums.pop(),
                       backend_config=backend)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return outcomes
