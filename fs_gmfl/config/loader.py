"""Load a run configuration from YAML plus ``KEY VALUE`` overrides.

As in FederatedScope, ``fs-gmfl run --cfg exp.yaml federate.total_round_num 5
gmfl.c 0.2`` reads the file, then applies each override; values are parsed
as YAML scalars (``True``, ``0.5``, ``[query,value]``).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from typing import Any

import yaml

from fs_gmfl.config.fields import build, to_dict
from fs_gmfl.config.safe_yaml import strict_load
from fs_gmfl.config.schema import HOST_ONLY_KEYS, HOST_ONLY_SECTIONS, RunConfig
from fs_gmfl.errors import ConfigError, InputError

logger = logging.getLogger(__name__)
_NOTICED: set[str] = set()


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a YAML mapping from ``path``.

    The file is parsed by :func:`~fs_gmfl.config.safe_yaml.strict_load`: a
    repeated key, nesting deeper than 64 levels or an alias bomb is an error.

    Raises:
        InputError: the file is missing, not a regular file (see
            :func:`check_regular_file`), unreadable, not UTF-8, not YAML, or not a mapping.
    """
    if check_regular_file(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = strict_load(fh)
    except FileNotFoundError:
        raise InputError(f"config file '{path}' does not exist") from None
    except OSError as err:
        raise InputError(f"config file '{path}' cannot be read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"config file '{path}' is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                         f"{err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    except (ValueError, OverflowError) as err:  # a NUL byte in the path; a scalar such as 2020-13-45
        raise InputError(f"config file {str(path)!r} cannot be read: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file '{path}' must hold a mapping of keys, not a {type(data).__name__}")
    return data


#: what ``stat`` calls the kinds of file a configuration cannot be read from.
FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular_file(path: str | os.PathLike[str]) -> bool:
    """Refuse, before opening it, a configuration path that is not a regular file; True for ``/dev/null``.

    Reading a FIFO blocks until a writer comes, and a device such as
    ``/dev/zero`` never ends, so only a regular file (or a symbolic link to
    one) is opened. ``/dev/null`` is the empty configuration (all defaults).

    Raises:
        InputError: the path does not exist, cannot be examined, or is not a regular file.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"config file '{path}' does not exist") from None
    except (OSError, ValueError) as err:  # a NUL byte in the path, a component that is not a directory, ...
        raise InputError(f"config file {str(path)!r} cannot be read: {getattr(err, 'strerror', None) or err}") from None
    if stat.S_ISREG(info.st_mode):
        return False
    if stat.S_ISCHR(info.st_mode) and info.st_rdev == os.stat(os.devnull).st_rdev:
        return True
    kind = next((name for test, name in FILE_KINDS if test(info.st_mode)), "not a regular file")
    raise InputError(f"config file '{path}' is {kind}, not a regular file; give a YAML file (or {os.devnull} for "
                     "all defaults)")


def parse_value(text: str) -> Any:
    """Parse an override value as a YAML scalar or flow collection (plain string if that fails)."""
    try:
        return strict_load(text)
    except (yaml.YAMLError, ValueError, OverflowError):
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``KEY VALUE`` pairs into the nested mapping ``data`` (modified and returned).

    Raises:
        ConfigError: an odd number of words, or a key that descends into a
            non-mapping value.
    """
    if len(overrides) % 2:
        raise ConfigError(overrides[-1], None, "overrides come in KEY VALUE pairs; this key has no value")
    for key, text in zip(overrides[::2], overrides[1::2]):
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), child, f"a mapping, to set '{key}'")
            node = child
        node[parts[-1]] = parse_value(text)
    return data


def strip_host_only(data: dict[str, Any]) -> list[str]:
    """Remove FederatedScope-only settings (``HOST_ONLY_*`` in the schema) from ``data``; return their keys.

    Each removed key is reported once per process, so a YAML file shared with
    the FederatedScope host loads here without its runtime settings being
    mistaken for simulator ones.
    """
    removed = [k for k in HOST_ONLY_SECTIONS if k in data]
    for key in removed:
        del data[key]
    for dotted in HOST_ONLY_KEYS:
        *parents, leaf = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            del node[leaf]
            removed.append(dotted)
    fresh = [k for k in removed if k not in _NOTICED]
    if fresh:
        _NOTICED.update(fresh)
        logger.warning("ignored by the embedded simulator (FederatedScope-only settings): %s", ", ".join(fresh))
    return removed


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a run configuration.

    Raises:
        InputError: the file cannot be read or parsed.
        ConfigError: a key is unknown or a value is not allowed.
    """
    data = apply_overrides(read_yaml(path) if path is not None else {}, overrides)
    strip_host_only(data)
    return build(RunConfig, data)


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved configuration as YAML (what ``config.yaml`` holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
