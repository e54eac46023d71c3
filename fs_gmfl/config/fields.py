"""Validated configuration dataclasses, built from plain (YAML) data.

Each configuration section is a ``@dataclass`` whose fields are declared with
:func:`opt`, which records a help text and the allowed values (choices or a
numeric range). :func:`build` turns a nested mapping into such a dataclass:

* unknown keys are rejected with the list of known ones (and a close match);
* every value is type-checked and range-checked; the first violation raises
  :class:`~fs_gmfl.errors.ConfigError` naming the dotted key, the value and
  what is allowed;
* cross-field rules live in each dataclass' ``__post_init__``, which raises
  :class:`ConfigError` as well (via :func:`fail`).

The module is pure Python so algorithm cores can use it for their configs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, Union, get_args, get_origin

from fs_gmfl.errors import ConfigError

T = TypeVar("T")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

_PATH_ATTR = "_fs_gmfl_key_prefix"


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple[Any, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    inferred: bool = False,
    nonfinite: bool = False,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """Declare a configuration field.

    Args:
        default: the default value (use ``factory`` for mutable defaults).
        help: one-line description shown by ``fs-gmfl keys`` and in the docs.
        choices: the allowed values, if the field is an enumeration.
        ge, gt, le, lt: inclusive/exclusive numeric bounds (checked for each
            element when the field is a list of numbers).
        inferred: the default is a design choice made by fs_gmfl where the
            paper or reference code is silent (flagged in the docs).
        nonfinite: NaN and infinities are allowed (they must then be
            documented in ``help``); by default every number in the value,
            including list elements and numbers inside mappings, must be finite.
        factory: a zero-argument callable producing the default.
    """
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "inferred": inferred,
            "nonfinite": nonfinite}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fail(section: Any, name: str, value: Any, allowed: str) -> typing.NoReturn:
    """Raise a :class:`ConfigError` for field ``name`` of a built section."""
    prefix = getattr(section, _PATH_ATTR, "")
    raise ConfigError(f"{prefix}{name}", value, allowed)


def describe_range(meta: Mapping[str, Any]) -> str:
    """Human-readable form of a field's numeric bounds, e.g. ``[0, 1)``."""
    lo = "(-inf" if meta["ge"] is None and meta["gt"] is None else (
        f"[{meta['ge']}" if meta["ge"] is not None else f"({meta['gt']}")
    hi = "inf)" if meta["le"] is None and meta["lt"] is None else (
        f"{meta['le']}]" if meta["le"] is not None else f"{meta['lt']})")
    return f"{lo}, {hi}"


def _has_bounds(meta: Mapping[str, Any]) -> bool:
    return any(meta.get(k) is not None for k in ("ge", "gt", "le", "lt"))


def _in_bounds(x: float, meta: Mapping[str, Any]) -> bool:
    return not (
        (meta["ge"] is not None and x < meta["ge"])
        or (meta["gt"] is not None and x <= meta["gt"])
        or (meta["le"] is not None and x > meta["le"])
        or (meta["lt"] is not None and x >= meta["lt"])
    )


@dataclasses.dataclass(frozen=True)
class TypeWords:
    """How :func:`describe_type` words each kind of annotation (error messages and the docs' key tables)."""

    scalars: Mapping[Any, str]
    list_of: Callable[[Any, str], str]  # (inner annotation, its words) -> words of the list
    mapping: str
    dataclass_of: Callable[[type], str] | None = None


def describe_type(tp: Any, words: TypeWords) -> str:
    """Words for the annotation ``tp``: lists, mappings, optionals and unions spelled out recursively."""
    origin = get_origin(tp)
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        return words.list_of(inner, describe_type(inner, words))
    if origin in (dict, Mapping):
        return words.mapping
    if origin is Union:
        names = [describe_type(a, words) for a in get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in get_args(tp) else "")
    if words.dataclass_of is not None and dataclasses.is_dataclass(tp):
        return words.dataclass_of(tp)
    return words.scalars.get(tp, getattr(tp, "__name__", str(tp)))


ERROR_WORDS = TypeWords(
    scalars={bool: "a boolean", int: "an integer", float: "a number", str: "a string", Any: "any value"},
    list_of=lambda inner, text: f"a list of {text}", mapping="a mapping",
    dataclass_of=lambda tp: f"a mapping of {tp.__name__} keys")


def _type_name(tp: Any) -> str:
    return describe_type(tp, ERROR_WORDS)


def first_nonfinite(value: Any, key: str, depth: int = 0) -> str | None:
    """The key (``a.b[2]``) of the first NaN or infinite number inside ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else key
    if depth > 64:
        return None
    if isinstance(value, Mapping):
        items: Any = ((f"{key}.{k}", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{key}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub_key, sub in items:
        found = first_nonfinite(sub, sub_key, depth + 1)
        if found is not None:
            return found
    return None


def _check_finite(value: Any, key: str, meta: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for a NaN or infinity anywhere in ``value`` unless the field allows them."""
    if meta.get("nonfinite"):
        return
    where = first_nonfinite(value, key)
    if where is not None:
        raise ConfigError(key, value, f"finite numbers only ({where} is NaN or infinite)" if where != key
                          else "a finite number (NaN and infinities are not allowed)")


def _coerce(value: Any, tp: Any, key: str, meta: Mapping[str, Any]) -> Any:
    """Check ``value`` against type ``tp`` and return the typed value."""
    if not dataclasses.is_dataclass(tp):
        _check_finite(value, key, meta)
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, meta)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(key, value, f"expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, f"expected {_type_name(tp)}")
        return build(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"expected {_type_name(tp)}")
        (inner, *_) = get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "expected a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "expected a boolean (True or False)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "expected an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-3 as a string; 1e999 becomes inf
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "expected a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        _check_finite(number, key, meta)
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "expected a string")
        return value
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _check_allowed(value: Any, key: str, meta: Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    items = value if isinstance(value, list) else [value]
    if choices is not None:
        for item in items:
            if item not in choices:
                raise ConfigError(key, value, "one of " + ", ".join(repr(c) for c in choices))
    if _has_bounds(meta):
        for item in items:
            if isinstance(item, (int, float)) and not isinstance(item, bool) and not _in_bounds(item, meta):
                kind = "an integer" if isinstance(item, int) else "a number"
                raise ConfigError(key, value, f"{kind} in {describe_range(meta)}")


def _unknown_key_error(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
    return ConfigError(f"{prefix}{key}", None, f"{hint}; known keys {where}: {', '.join(names)}", unknown=True)


def build(cls: type[T], data: Mapping[str, Any] | None, *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating every key.

    Args:
        cls: a dataclass whose fields were declared with :func:`opt`.
        data: the mapping read from YAML (``None`` means all defaults).
        prefix: dotted prefix used in error messages (``"gmfl."``).

    Raises:
        ConfigError: on an unknown key, a wrongly typed value, a value outside
            its choices or range, or a violated cross-field rule.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    for key in data:
        if key not in known:
            raise _unknown_key_error(cls, str(key), prefix)
    kwargs = {}
    for name, field in known.items():
        if name in data:
            value = _coerce(data[name], hints[name], prefix + name, field.metadata)
            _check_allowed(value, prefix + name, field.metadata)
            kwargs[name] = value
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build(hints[name], None, prefix=prefix + name + ".")
    obj = cls.__new__(cls)
    object.__setattr__(obj, _PATH_ATTR, prefix)
    obj.__init__(**kwargs)  # runs __post_init__ with the prefix already known
    return obj


def make(cls: type[T], prefix: str = "", **values: Any) -> T:
    """Build ``cls`` from keyword arguments (convenience for code and tests)."""
    return build(cls, values, prefix=prefix)


def to_dict(obj: Any) -> Any:
    """Convert a built configuration back to plain data (for ``config.yaml``)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.name.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def iter_keys(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, Any, str, Mapping[str, Any], Any]]:
    """Yield ``(dotted_key, default, type_name, metadata, type)`` for every leaf key of ``cls``."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name.startswith("_"):
            continue
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, prefix + field.name + ".")
            continue
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        yield prefix + field.name, to_dict(default), _type_name(tp), field.metadata, tp
