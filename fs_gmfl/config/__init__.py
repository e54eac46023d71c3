"""Run configuration: validated dataclasses loaded from FederatedScope-style YAML."""

from fs_gmfl.config.loader import load_config
from fs_gmfl.config.schema import RunConfig

__all__ = ["RunConfig", "load_config"]
