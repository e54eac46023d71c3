"""Flower apps of an fs_gmfl run: ``fs-gmfl flower-run`` (simulation engine) and a generated ``flwr run`` app.

* :func:`simulate` runs a configuration on Flower's simulation engine in this
  process: ``federate.client_num`` virtual nodes (partition ``i`` = fs_gmfl
  client ``i``), ``flower.max_parallel`` of them training at once.
* :func:`write_app` writes a Flower app folder (``pyproject.toml`` with
  ``[tool.flwr.app]``, the resolved YAML, a two-line module) that ``flwr run
  <folder> <federation>`` runs on the local simulation federation or on a
  deployment (SuperLink + one SuperNode per partition).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fs_gmfl.config import load_config
from fs_gmfl.config.loader import config_to_yaml
from fs_gmfl.config.schema import RunConfig
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.flower.client import make_client_app
from fs_gmfl.hosts.flower.server import FlowerRun, check_flower_config

APP_MODULE = "fs_gmfl_app"
APP_CONFIG = "run.yaml"


@dataclass
class RunRequest:
    """What a ServerApp runs: the configuration and the simulator-style options."""

    cfg: RunConfig
    quiet: bool = False
    resume: bool = False
    overwrite: bool = False


@dataclass
class Outcome:
    """What the ServerApp thread hands back: the summary, or the error that ended the run."""

    summary: dict[str, Any] | None = None
    error: BaseException | None = None
    run: FlowerRun | None = field(default=None, repr=False)


def make_server_app(resolve: Callable[[Any], RunRequest], outcome: Outcome | None = None) -> Any:
    """A ``ServerApp`` whose ``main`` runs :class:`FlowerRun` on the request ``resolve(context)`` gives."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        request = resolve(context)
        run = FlowerRun(request.cfg, grid, quiet=request.quiet, resume=request.resume, overwrite=request.overwrite)
        if outcome is not None:
            outcome.run = run
        try:
            summary = run.run()
        except BaseException as err:  # handed to the caller of the simulation; the engine would log a traceback
            if outcome is None:
                raise
            outcome.error = err
            return
        if outcome is not None:
            outcome.summary = summary

    return app


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Flower's simulation backend settings: resources per client, and Ray sized to ``flower.max_parallel``."""
    flower = cfg.flower
    parallel = flower.parallel_clients(cfg.federate.client_num)
    init: dict[str, Any] = {"num_cpus": parallel * flower.client_cpus, "num_gpus": parallel * flower.client_gpus,
                            "include_dashboard": False, "log_to_driver": False}
    if flower.ray_temp_dir:
        init["_temp_dir"] = os.path.abspath(flower.ray_temp_dir)
    return {"client_resources": {"num_cpus": flower.client_cpus, "num_gpus": flower.client_gpus},
            "init_args": init}


class _DropDeprecation(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated in favour of ``flwr run`` (both are offered)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


@contextlib.contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower's logger at WARNING (its DEBUG lines otherwise fill the terminal) without the deprecation notice."""
    flwr_logger = logging.getLogger("flwr")
    level, dropper = flwr_logger.level, _DropDeprecation()
    flwr_logger.setLevel(logging.WARNING)
    flwr_logger.addFilter(dropper)
    try:
        yield
    finally:
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(dropper)


def simulate(request: RunRequest) -> Outcome:
    """Run ``request`` on Flower's simulation engine in this process; the outcome (summary or error)."""
    from flwr.simulation import run_simulation

    check_flower_config(request.cfg)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    outcome = Outcome()
    with quiet_flower():
        run_simulation(server_app=make_server_app(lambda context: request, outcome), client_app=make_client_app(),
                       num_supernodes=request.cfg.federate.client_num, backend_config=backend_config(request.cfg))
    if outcome.summary is None and outcome.error is None:
        outcome.error = RuntimeError("Flower's simulation ended without running the server app (see its log)")
    return outcome


# -- a flwr app folder -------------------------------------------------------------------------------------------
PYPROJECT = """\
# A Flower app running an fs_gmfl configuration ({app_config}); written by `fs-gmfl flower-app`.
# Local simulation:  flwr run {folder} --run-config "overrides='federate.total_round_num 2'"
# Deployment:        see docs/flower.md (one flower-superlink, one flower-supernode per partition).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "fs_gmfl run {run_name} on Flower"
dependencies = ["fs_gmfl"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fs_gmfl"

[tool.flwr.app.components]
serverapp = "{module}:server_app"
clientapp = "{module}:client_app"

[tool.flwr.app.config]
cfg = "{app_config}"
overrides = ""
resume = false
overwrite = false
"""

MODULE = '''\
"""The fs_gmfl server and client apps of this folder's configuration (written by `fs-gmfl flower-app`)."""
from pathlib import Path

from fs_gmfl.hosts.flower.app import folder_client_app, folder_server_app

server_app = folder_server_app(Path(__file__).parent)
client_app = folder_client_app()
'''


def write_app(cfg: RunConfig, folder: Path) -> Path:
    """Write a Flower app for ``cfg`` into ``folder`` (created; existing app files replaced); the folder."""
    check_flower_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    # the ServerApp runs in another process and directory: the outputs go where this command would put them
    text = config_to_yaml(dataclasses.replace(cfg, outdir=os.path.abspath(cfg.outdir)))
    (folder / APP_CONFIG).write_text(text, encoding="utf-8")
    (folder / f"{APP_MODULE}.py").write_text(MODULE, encoding="utf-8")
    name = "fs-gmfl-" + "".join(c if c.isalnum() else "-" for c in cfg.run_name.lower()).strip("-")
    text = PYPROJECT.format(app_config=APP_CONFIG, folder=folder, name=name or "fs-gmfl-run", run_name=cfg.run_name,
                            module=APP_MODULE)
    (folder / "pyproject.toml").write_text(text, encoding="utf-8")
    return folder


def request_from_run_config(folder: Path, run_config: dict[str, Any]) -> RunRequest:
    """The run a ``flwr run`` of an app folder asks for: its YAML (``cfg``, relative to the folder) and overrides."""
    cfg_path = Path(str(run_config.get("cfg", APP_CONFIG)))
    if not cfg_path.is_absolute():
        cfg_path = folder / cfg_path
    overrides = run_config.get("overrides", "")
    if not isinstance(overrides, str):
        raise InputError(f"run config 'overrides' must be a string of KEY VALUE pairs, got {overrides!r}")
    words: Sequence[str] = shlex.split(overrides)
    if len(words) % 2:
        raise InputError(f"run config 'overrides' = {overrides!r} is not a list of KEY VALUE pairs")
    flags = {}
    for name in ("resume", "overwrite"):
        value = run_config.get(name, False)
        if not isinstance(value, bool):
            raise ConfigError(f"run config '{name}'", value, "true or false")
        flags[name] = value
    return RunRequest(load_config(cfg_path, words), quiet=True, **flags)


def folder_server_app(folder: Path) -> Any:
    """The ServerApp of a generated app folder: the folder's YAML with the run config's overrides.

    (Flower checks an app's components by reading the module's syntax: each
    must be a plain ``name = ...`` assignment, hence one function per app.)
    """
    return make_server_app(lambda context: request_from_run_config(folder, dict(context.run_config)))


def folder_client_app() -> Any:
    """The ClientApp of a generated app folder (the configuration comes with every downlink)."""
    return make_client_app()
