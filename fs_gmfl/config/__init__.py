"""Run configuration: validated dataclasses loaded from FederatedScope-style YAML.

``RunConfig`` and ``load_config`` are imported lazily, so that algorithm
cores can import :mod:`fs_gmfl.config.fields` for their own config
dataclasses without importing the schema, which imports those cores.
"""

from typing import Any

__all__ = ["RunConfig", "load_config"]


def __getattr__(name: str) -> Any:
    if name == "load_config":
        from fs_gmfl.config.loader import load_config

        return load_config
    if name == "RunConfig":
        from fs_gmfl.config.schema import RunConfig

        return RunConfig
    raise AttributeError(f"module 'fs_gmfl.config' has no attribute '{name}'")
