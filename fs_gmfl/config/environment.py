"""The ``FS_GMFL_*`` environment variables the package reads, validated like configuration keys.

A variable that is set must hold an allowed value; anything else (empty,
non-numeric, negative, NaN, out of range, a path that cannot serve) raises
:class:`~fs_gmfl.errors.EnvironmentVariableError`, which the command line
prints as one line naming the variable, the value and what is allowed (exit
code 2). Unset variables take their documented defaults.
:func:`check_environment` checks them all before a command starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fs_gmfl.errors import EnvironmentVariableError


@dataclass(frozen=True)
class IntegerVariable:
    """An environment variable holding a whole number from ``low`` to ``high``.

    Args:
        name: the variable, e.g. ``FS_GMFL_THREADS``.
        low, high: the allowed range.
        meaning: what the number is, in words (for the error message).
        unset: what happens when the variable is unset, in words.
    """

    name: str
    low: int
    high: int
    meaning: str
    unset: str

    def parse(self, value: str) -> int:
        """The number ``value`` spells (ASCII digits, surrounding blanks ignored).

        Raises:
            EnvironmentVariableError: anything but a whole number from ``low`` to ``high``.
        """
        text = value.strip()
        if not re.fullmatch(r"[0-9]{1,30}", text) or not self.low <= int(text) <= self.high:
            raise EnvironmentVariableError(self.name, value, f"{self.meaning} from {self.low} to {self.high}, or "
                                           f"unset for {self.unset}")
        return int(text)

    def read(self, environ: Mapping[str, str] = os.environ) -> int | None:
        """The variable's number, ``None`` when unset."""
        value = environ.get(self.name)
        return None if value is None else self.parse(value)


@dataclass(frozen=True)
class DirectoryVariable:
    """An environment variable naming a directory.

    Args:
        name: the variable, e.g. ``FS_GMFL_DATA``.
        must_exist: the directory is read (it must exist) rather than created on demand (it must not be a file).
        unset: what happens when the variable is unset, in words.
    """

    name: str
    must_exist: bool
    unset: str

    def parse(self, value: str) -> Path:
        """The directory ``value`` names (``~`` expanded).

        Raises:
            EnvironmentVariableError: empty, a NUL character, a missing directory (``must_exist``) or a file.
        """
        path = Path(value).expanduser() if value.strip() and "\0" not in value else None
        unusable = path is None or (path.exists() and not path.is_dir()) or (self.must_exist and not path.is_dir())
        if unusable:
            kind = "an existing directory" if self.must_exist else "a directory path (created when needed)"
            raise EnvironmentVariableError(self.name, value, f"{kind}, or unset for {self.unset}")
        return path

    def read(self, environ: Mapping[str, str] = os.environ) -> Path | None:
        """The variable's directory, ``None`` when unset."""
        value = environ.get(self.name)
        return None if value is None else self.parse(value)


THREADS = IntegerVariable("FS_GMFL_THREADS", 1, 4096, "a positive integer (torch threads)", "the usable CPUs")
MEMORY_BYTES = IntegerVariable("FS_GMFL_MEMORY_BYTES", 1, 2**60, "a whole number of bytes (the memory budget of "
                               "the pre-flight check)", "the available memory and the cgroup limit")
DATA = DirectoryVariable("FS_GMFL_DATA", True, "data.root and the installed data only")
CACHE = DirectoryVariable("FS_GMFL_CACHE", False, "~/.cache/fs_gmfl")
#: every ``FS_GMFL_*`` variable the package reads.
VARIABLES = (THREADS, MEMORY_BYTES, DATA, CACHE)


def check_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Validate every ``FS_GMFL_*`` variable that is set.

    Raises:
        EnvironmentVariableError: the first variable whose value is not allowed.
    """
    for variable in VARIABLES:
        variable.read(environ)
