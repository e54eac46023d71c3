"""Explicit, idempotent registration of fs_gmfl's pieces in FederatedScope's registries.

:func:`register_all` registers, under the key ``fs_gmfl``:

* the configuration (every fs_gmfl key and the check function), applied to the
  already-built ``global_cfg`` as well, since FederatedScope builds it at import;
* the trainer ``trainer.type: fs_gmfl_llmtrainer``;
* the server/client workers for every fs_gmfl ``federate.method`` (the
  aggregator is installed by the server: FederatedScope has no aggregator
  registry);
* the data and model builders for fs_gmfl's own datasets and backbones.

Calling it again changes nothing. A key already registered by someone else,
or another plug-in claiming one of fs_gmfl's method names or its trainer
type, raises :class:`RegistrationConflict` instead of FederatedScope's silent
overwrite.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from federatedscope import register
from federatedscope.core.configs import constants

from fs_gmfl.errors import FsGmflError
from fs_gmfl.hosts.fs.builders import build_fs_data, build_fs_model
from fs_gmfl.hosts.fs.config import TRAINER_TYPE, extend_cfg, owned_methods
from fs_gmfl.hosts.fs.trainer import FsGmflTrainer
from fs_gmfl.hosts.fs.workers import FsGmflClient, FsGmflServer

KEY = "fs_gmfl"


class RegistrationConflict(FsGmflError):
    """Another FederatedScope plug-in already holds a name fs_gmfl needs."""


def call_trainer(trainer_type: str) -> type | None:
    """FederatedScope trainer builder: the fs_gmfl trainer for ``trainer.type: fs_gmfl_llmtrainer``."""
    return FsGmflTrainer if trainer_type == TRAINER_TYPE else None


def call_worker(method: str) -> dict[str, type] | None:
    """FederatedScope worker builder: fs_gmfl's server and client for fs_gmfl methods."""
    return {"client": FsGmflClient, "server": FsGmflServer} if method in owned_methods() else None


def _claim(registry: MutableMapping[str, Any], add: Callable[[str, Any], None], what: str, fn: Any) -> None:
    existing = registry.get(KEY)
    if existing is fn:
        return
    if existing is not None:
        raise RegistrationConflict(f"FederatedScope {what} '{KEY}' is already registered to "
                                   f"{existing.__module__}.{existing.__qualname__}")
    add(KEY, fn)


def _check_names_free() -> None:
    for key, fn in register.worker_dict.items():
        taken = [m for m in owned_methods() if key != KEY and fn(m) is not None]
        if taken:
            raise RegistrationConflict(f"FederatedScope worker plug-in '{key}' already claims federate.method {taken}")
    for key, fn in register.trainer_dict.items():
        if key != KEY and fn(TRAINER_TYPE) is not None:
            raise RegistrationConflict(f"FederatedScope trainer plug-in '{key}' already claims '{TRAINER_TYPE}'")


def register_all() -> None:
    """Register fs_gmfl in FederatedScope (idempotent; raises :class:`RegistrationConflict` on a clash)."""
    from federatedscope.core.configs.config import global_cfg

    _check_names_free()
    _claim(register.config_dict, register.register_config, "config", extend_cfg)
    extend_cfg(global_cfg)
    _claim(register.trainer_dict, register.register_trainer, "trainer", call_trainer)
    _claim(register.worker_dict, register.register_worker, "worker", call_worker)
    _claim(register.data_dict, register.register_data, "data builder", build_fs_data)
    _claim(register.model_dict, register.register_model, "model builder", build_fs_model)
    for method in owned_methods():
        constants.AGGREGATOR_TYPE.setdefault(method, "clients_avg")
