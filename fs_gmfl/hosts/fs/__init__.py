"""The FederatedScope-LLM host adapter: the only part of fs_gmfl that imports ``federatedscope``.

Importing this package is cheap and does not import FederatedScope;
:func:`load_plugin` (the ``federatedscope.plugins`` entry point) and
:func:`register_all` do.
"""

from __future__ import annotations

import importlib.util

__all__ = ["fs_available", "load_plugin", "register_all"]


def fs_available() -> bool:
    """Whether FederatedScope can be imported (``False`` also when its import machinery refuses it)."""
    try:
        return importlib.util.find_spec("federatedscope") is not None
    except (ImportError, ValueError):
        return False


def register_all() -> None:
    """Register fs_gmfl's config, trainer, workers and builders in FederatedScope (idempotent)."""
    from fs_gmfl.hosts.fs.registration import register_all as _register_all

    _register_all()


def load_plugin() -> None:
    """Entry point of the ``federatedscope.plugins`` group: register everything (cheap, idempotent)."""
    register_all()
