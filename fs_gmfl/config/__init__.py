"""Run configuration: validated dataclasses loaded from FederatedScope-style YAML."""

from __future__ import annotations

from typing import Any

__all__ = ["RunConfig", "load_config"]


def __getattr__(name: str) -> Any:
    # Lazy, so that algorithm cores can import fs_gmfl.config.fields without importing the schema,
    # which imports their own config classes (an import cycle when a core package is imported first).
    if name == "RunConfig":
        from fs_gmfl.config.schema import RunConfig

        return RunConfig
    if name == "load_config":
        from fs_gmfl.config.loader import load_config

        return load_config
    raise AttributeError(f"module 'fs_gmfl.config' has no attribute {name!r}")
