"""Error types of fs_gmfl.

Every error a user can trigger through configuration or input carries enough
context to be printed as a single line by the command-line interface (which
then exits with the error's :attr:`~FsGmflError.exit_code`, 2 for
configuration and input errors), without a traceback.
"""

from __future__ import annotations

from typing import Any


class FsGmflError(Exception):
    """Base class of all errors raised on purpose by fs_gmfl.

    Attributes:
        exit_code: the status the command line exits with (2: bad configuration or input).
    """

    exit_code = 2


class ConfigError(FsGmflError, ValueError):
    """A configuration key has a value that is not allowed.

    Args:
        key: the dotted key, e.g. ``gmfl.c``.
        value: the offending value (``None`` for a missing or unknown key).
        allowed: what would have been accepted, in words.
        subject: what ``key`` names, for the message (an environment variable's subclass says so).
    """

    def __init__(self, key: str, value: Any, allowed: str, *, unknown: bool = False,
                 subject: str = "config key") -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.unknown = unknown
        if unknown:
            super().__init__(f"unknown {subject} '{key}'{allowed}")
        else:
            super().__init__(f"{subject} '{key}' = {value!r} is not allowed: {allowed}")


class EnvironmentVariableError(ConfigError):
    """An ``FS_GMFL_*`` environment variable has a value that is not allowed (see :mod:`fs_gmfl.config.environment`).

    Args:
        name: the variable, e.g. ``FS_GMFL_THREADS``.
        value: its value, as set.
        allowed: what would have been accepted, in words.
    """

    def __init__(self, name: str, value: str, allowed: str) -> None:
        super().__init__(name, value, allowed, subject="environment variable")


class InputError(FsGmflError, ValueError):
    """Bad input that is not a configuration value (missing file, bad data, ...)."""


class AggregationError(FsGmflError):
    """Aggregation cannot produce a result from the replies it was given."""


class RunStopped(FsGmflError):
    """A run that started correctly was stopped because going on could not help (exit status 1).

    Raised by the embedded simulator after ``federate.max_rejected_rounds``
    rounds in a row in which every client update was rejected; its outputs
    (``summary.json`` with ``stopped``) are written first.
    """

    exit_code = 1
