"""Command-line options shared by the benchmarks: a one-line-error parser, ``--quick`` defaults and validators.

Every validator is an argparse ``type=``: it turns the option's text into a
value or raises :class:`argparse.ArgumentTypeError` with the value and what
is allowed, which :class:`BenchParser` prints as one line
(``fs-gmfl bench NAME: error: option --rounds: -1 is outside 1..10000000``)
before exiting with code 2. Explicit values are therefore checked before
anything runs, with or without ``--quick``.
"""

from __future__ import annotations

import argparse
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fs_gmfl.cli import OneLineParser

#: the largest count (rounds, clients, steps, repeats, ...) any benchmark option accepts.
MAX_COUNT = 10**7
#: seeds are 32-bit unsigned integers (what every random generator the runs seed accepts).
MAX_SEED = 2**32 - 1


class BenchParser(OneLineParser):
    """The option parser of ``fs-gmfl bench NAME``: one-line errors naming the option, exit code 2.

    Args:
        name: the benchmark's name (the program is ``fs-gmfl bench NAME``).
        doc: the benchmark module's docstring (its first paragraph describes it in ``--help``).
        quick: with ``--quick``, these option values (by destination) replace the defaults; options given
            explicitly on the command line keep their own, validated values. ``None``: no ``--quick``.
        quick_help: what ``--quick`` runs, for ``--help``.
    """

    def __init__(self, name: str, doc: str, *, quick: Mapping[str, Any] | None = None, quick_help: str = "") -> None:
        super().__init__(prog=f"fs-gmfl bench {name}", description=doc.split("\n\n")[0])
        self.quick = dict(quick or {})
        if quick is not None:
            self.add_argument("--quick", action="store_true",
                              help=f"{quick_help} (options given explicitly keep their values)")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """Parse (and validate) ``args``; with ``--quick``, parse again over the quick defaults."""
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "quick", False) and self.quick:
            self.set_defaults(**self.quick)
            parsed = super().parse_args(args, namespace)
        return parsed

    def error(self, message: str) -> typing.NoReturn:  # noqa: D102 - argparse hook
        if message.startswith("argument -"):
            message = "option " + message.removeprefix("argument ")
        super().error(message)


# -- numbers ------------------------------------------------------------------------------------------------------
def integer(text: str, low: int, high: int) -> int:
    """An integer from ``low`` to ``high``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
    return value


def count(high: int = MAX_COUNT) -> Callable[[str], int]:
    """Validator: an integer from 1 to ``high``."""
    return lambda text: integer(text, 1, high)


def positive(text: str) -> int:
    """An integer from 1 to ``MAX_COUNT`` (rounds, clients, steps, repeats, sizes)."""
    return integer(text, 1, MAX_COUNT)


def non_negative(text: str) -> int:
    """An integer from 0 to ``MAX_COUNT`` (where 0 switches something off or means "the default")."""
    return integer(text, 0, MAX_COUNT)


def run_seed(text: str) -> int:
    """A run seed, 0 to ``MAX_SEED``."""
    return integer(text, 0, MAX_SEED)


def real(text: str, *, low: float = 0.0, high: float = math.inf, low_open: bool = True) -> float:
    """A finite number in ``(low, high]`` (``[low, high]`` when not ``low_open``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if not (value > low if low_open else value >= low) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
        raise argparse.ArgumentTypeError(f"{text!r} is outside {interval}")
    return value


def positive_real(text: str) -> float:
    """A finite number above 0 (learning rates, Dirichlet concentrations)."""
    return real(text)


def non_negative_real(text: str) -> float:
    """A finite number from 0 (where 0 means "the default")."""
    return real(text, low_open=False)


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    return real(text, high=1.0)


# -- lists --------------------------------------------------------------------------------------------------------
def items(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated list."""
    return [item.strip() for item in text.split(",") if item.strip()]


def int_list(item: Callable[[str], int], *, what: str, allow_empty: bool = False) -> Callable[[str], list[int]]:
    """Validator: comma-separated integers, each checked by ``item``; at least one unless ``allow_empty``."""

    def parse(text: str) -> list[int]:
        values = [item(word) for word in items(text)]
        if not values and not allow_empty:
            raise argparse.ArgumentTypeError(f"needs at least one {what}")
        return values

    return parse


#: comma-separated seeds, at least one.
seed_list = int_list(run_seed, what="seed")


def subset(allowed: Sequence[str], *, what: str = "method") -> Callable[[str], list[str]]:
    """Validator: a comma-separated, non-empty subset of ``allowed`` (in the given order, repeats dropped).

    ``what`` names one item in the error message (``unknown method 'x'``).
    """

    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(items(text)))
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            problem = (f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}" if unknown
                       else f"{text!r} names no {what}")
            raise argparse.ArgumentTypeError(f"{problem}; expected a comma-separated subset of {', '.join(allowed)}")
        return names

    return parse


#: a module-name suffix: dotted identifiers (``query``, ``attention.output.dense``).
MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_0-9]\w*)*")


def module_names(text: str) -> list[str]:
    """Comma-separated module-name suffixes (``query,attention.output.dense``), at least one, repeats dropped."""
    names = list(dict.fromkeys(items(text)))
    bad = [name for name in names if not MODULE_NAME.fullmatch(name)]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not a module name (dotted identifiers, e.g. "
                                         "query or attention.output.dense)")
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no module; expected comma-separated module names")
    return names


def assignments(allowed: Sequence[str], value: Callable[[str], Any], *,
                form: str = "NAME=VALUE") -> Callable[[str], dict[str, Any]]:
    """Validator: ``NAME=VALUE,...`` with each NAME one of ``allowed`` and each VALUE checked by ``value``.

    ``form`` spells the pair in the error message (e.g. ``METHOD=N``).
    """

    def parse(text: str) -> dict[str, Any]:
        out = {}
        for item in items(text):
            name, sep, raw = item.partition("=")
            if not sep or name.strip() not in allowed:
                raise argparse.ArgumentTypeError(f"{item!r}: expected {form} with {form.split('=')[0]} one of "
                                                 f"{', '.join(allowed)}")
            out[name.strip()] = value(raw.strip())
        return out

    return parse


# -- paths --------------------------------------------------------------------------------------------------------
def output_dir(text: str) -> str:
    """A directory for the benchmark's outputs: a non-empty path that is not an existing file."""
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory path")
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return text
