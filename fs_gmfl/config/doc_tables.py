"""Markdown tables of configuration keys, generated from the ``opt()`` declarations.

A documentation page holds a generated table between two marker comments that name one or more
comma-separated key prefixes::

    <!-- keys:gmfl,federate.client_weight -->
    | key | default | allowed | meaning |
    ...
    <!-- /keys:gmfl,federate.client_weight -->

A prefix selects the key itself and every key below it (``federate`` selects ``federate.method``, ...; the
empty prefix ``.`` selects the top-level scalar keys such as ``seed``). A list of mappings (``hafl.profiles``,
``llm.adapter.args``) gets one row for the list and one row per field of an entry (``hafl.profiles[].share``).

``python -m fs_gmfl.config.doc_tables`` rewrites every block in ``README.md`` and ``docs/**/*.md`` from the
current declarations; ``--check`` changes nothing and exits 1, naming the pages, when one is out of date
(``tests/test_docs.py`` runs the same check). ``fs-gmfl keys SECTION --markdown`` prints one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

from fs_gmfl.config.fields import TypeWords, describe_type, iter_keys, to_dict

#: the command that refreshes the tables (quoted in the test's failure message).
REFRESH_COMMAND = "python -m fs_gmfl.config.doc_tables"
#: ``<!-- keys:SPEC -->`` ... ``<!-- /keys:SPEC -->``; SPEC is comma-separated prefixes.
MARKER = re.compile(r"<!-- keys:(?P<spec>[A-Za-z0-9_.,\[\]]+) -->\n(?P<body>.*?)<!-- /keys:(?P=spec) -->",
                    re.DOTALL)
HEADER = "| key | default | allowed | meaning |\n|---|---|---|---|"


@dataclasses.dataclass(frozen=True)
class KeyRow:
    """One documented key: its dotted name, default, declared metadata and type."""

    key: str
    default: Any
    meta: Mapping[str, Any]
    tp: Any


def _list_item_dataclass(tp: Any) -> Any:
    """The dataclass of a ``list[SomeDataclass]`` type, else None."""
    if get_origin(tp) in (list, tuple):
        args = get_args(tp)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def all_rows(root: type | None = None) -> list[KeyRow]:
    """Every configuration key of ``root`` (default: the run configuration), lists of mappings expanded."""
    if root is None:
        from fs_gmfl.config.schema import RunConfig

        root = RunConfig
    rows = []
    for key, default, _type_name, meta, tp in iter_keys(root):
        rows.append(KeyRow(key, default, meta, tp))
        item = _list_item_dataclass(tp)
        if item is not None:
            rows.extend(KeyRow(sub, d, m, t) for sub, d, _n, m, t in iter_keys(item, key + "[]."))
    return rows


def select(rows: Sequence[KeyRow], spec: str) -> list[KeyRow]:
    """The rows a marker's comma-separated prefixes select, in declaration order.

    Raises:
        ValueError: a prefix selects no key (a renamed or removed section).
    """
    chosen: list[KeyRow] = []
    for prefix in spec.split(","):
        if prefix == ".":
            hits = [r for r in rows if "." not in r.key]
        else:
            hits = [r for r in rows if r.key == prefix or r.key.startswith(prefix + ".")
                    or r.key.startswith(prefix + "[].")]
        if not hits:
            raise ValueError(f"no configuration key under '{prefix}' (marker keys:{spec})")
        chosen.extend(r for r in hits if r not in chosen)
    return chosen


def _num(x: float) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _bounds(meta: Mapping[str, Any]) -> str:
    lo = ("[", meta["ge"]) if meta.get("ge") is not None else ("(", meta["gt"]) if meta.get("gt") is not None \
        else None
    hi = ("]", meta["le"]) if meta.get("le") is not None else (")", meta["lt"]) if meta.get("lt") is not None \
        else None
    if lo and hi:
        return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return ("≥ " if lo[0] == "[" else "> ") + _num(lo[1])
    if hi:
        return ("≤ " if hi[0] == "]" else "< ") + _num(hi[1])
    return ""


DOC_WORDS = TypeWords(
    scalars={bool: "bool", int: "integer", float: "number", str: "string", Any: "any"},
    list_of=lambda inner, text: ("list of mappings (fields below)" if dataclasses.is_dataclass(inner)
                                 else f"list of {text}s"),
    mapping="mapping")


def _type_word(tp: Any) -> str:
    return describe_type(tp, DOC_WORDS)


def allowed(row: KeyRow) -> str:
    """The 'allowed' cell: choices, or the type with its numeric bounds."""
    choices = row.meta.get("choices")
    is_list = get_origin(row.tp) in (list, tuple)
    if choices:
        text = ", ".join(f"`{c}`" for c in choices)
        return ("list of: " + text) if is_list else text
    word = _type_word(row.tp)
    bounds = _bounds(row.meta)
    if bounds and is_list:
        return f"{word}, each {bounds}"
    return f"{word} {bounds}".strip()


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return _num(value) if math.isfinite(value) and value.is_integer() else repr(value)
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}"
    return str(value)


def default_cell(row: KeyRow) -> str:
    """The 'default' cell, flagged *inferred* where the default is fs_gmfl's choice."""
    if _list_item_dataclass(row.tp) is not None and row.default:
        text = f"{len(row.default)} entry with the defaults below" if len(row.default) == 1 else \
            f"{len(row.default)} entries"
    else:
        text = f"`{_scalar(to_dict(row.default))}`"
    return text + (" *inferred*" if row.meta.get("inferred") else "")


def _escape(text: str) -> str:
    """Make free text safe inside a markdown table cell (pipes, emphasis stars, HTML-like brackets)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def markdown_table(spec: str, rows: Sequence[KeyRow] | None = None) -> str:
    """The markdown table of the keys selected by ``spec`` (see :func:`select`), without a final newline."""
    lines = [HEADER]
    for row in select(rows if rows is not None else all_rows(), spec):
        lines.append(f"| `{row.key}` | {default_cell(row)} | {allowed(row)} | {_escape(row.meta.get('help', ''))} |")
    return "\n".join(lines)


def refresh_text(text: str, rows: Sequence[KeyRow] | None = None) -> str:
    """``text`` with every marker block regenerated."""
    rows = rows if rows is not None else all_rows()

    def block(match: re.Match[str]) -> str:
        spec = match.group("spec")
        return f"<!-- keys:{spec} -->\n{markdown_table(spec, rows)}\n<!-- /keys:{spec} -->"

    return MARKER.sub(block, text)


def documented_keys(text: str, rows: Sequence[KeyRow] | None = None) -> set[str]:
    """The keys the marker blocks of ``text`` document."""
    rows = rows if rows is not None else all_rows()
    return {row.key for match in MARKER.finditer(text) for row in select(rows, match.group("spec"))}


def repository_root() -> Path:
    """The project root (the directory holding ``README.md`` and ``docs/``)."""
    return Path(__file__).resolve().parents[2]


def pages(root: Path | None = None) -> list[Path]:
    """``README.md`` and every ``docs/**/*.md`` page."""
    root = root or repository_root()
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def stale_pages(root: Path | None = None) -> Iterator[Path]:
    """The pages whose generated tables differ from the declarations."""
    rows = all_rows()
    for page in pages(root):
        text = page.read_text(encoding="utf-8")
        if refresh_text(text, rows) != text:
            yield page


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with ``--check`` only verify) the generated key tables of the documentation."""
    parser = argparse.ArgumentParser(prog=REFRESH_COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is out of date")
    parser.add_argument("--root", type=Path, default=None, help="project root (default: this package's)")
    args = parser.parse_args(argv)
    root = args.root or repository_root()
    stale = list(stale_pages(root))
    for page in stale:
        if args.check:
            print(f"out of date: {page.relative_to(root)}", file=sys.stderr)
        else:
            page.write_text(refresh_text(page.read_text(encoding="utf-8")), encoding="utf-8")
            print(f"refreshed: {page.relative_to(root)}")
    if args.check and stale:
        print(f"run `{REFRESH_COMMAND}` to refresh them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
