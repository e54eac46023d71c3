"""Error types of fs_gmfl.

Every error a user can trigger through configuration or input carries enough
context to be printed as a single line by the command-line interface (which
then exits with code 2), without a traceback.
"""

from __future__ import annotations

from typing import Any


class FsGmflError(Exception):
    """Base class of all errors raised on purpose by fs_gmfl."""


class ConfigError(FsGmflError, ValueError):
    """A configuration key has a value that is not allowed.

    Args:
        key: the dotted key, e.g. ``gmfl.c``.
        value: the offending value (``None`` for a missing or unknown key).
        allowed: what would have been accepted, in words.
    """

    def __init__(self, key: str, value: Any, allowed: str, *, unknown: bool = False) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.unknown = unknown
        if unknown:
            super().__init__(f"unknown config key '{key}'{allowed}")
        else:
            super().__init__(f"config key '{key}' = {value!r} is not allowed: {allowed}")


class InputError(FsGmflError, ValueError):
    """Bad input that is not a configuration value (missing file, bad data, ...)."""


class PayloadRejected(FsGmflError):
    """A client update failed validation and was not aggregated.

    Args:
        client_id: the client whose payload was rejected.
        reason: why, in words (logged and counted in ``summary.json``).
    """

    def __init__(self, client_id: int, reason: str) -> None:
        self.client_id = client_id
        self.reason = reason
        super().__init__(f"update of client {client_id} rejected: {reason}")


class AggregationError(FsGmflError):
    """Aggregation cannot produce a result from the replies it was given."""
