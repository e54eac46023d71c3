"""Instruction-tuning data: rows of ``instruction`` / ``input`` / ``output`` / ``category``.

Readers for causal-LM fine-tuning (see ``docs/llm_data.md``):

=============================  ==================================================================
``data.type``                  rows
=============================  ==================================================================
``<file>.jsonl@llm``           FederatedScope-LLM JSON lines, one ``{instruction, input, output,
                               category}`` object per line; the file is ``data.root/<file>.jsonl``
                               (an absolute ``<file>`` is used as is)
``<file>.json@llm``            FederatedScope-LLM JSON: one list of such objects
``evals_math``                 8 short-answer math tasks of the OpenAI evals registry, read from the
                               ``evals-3.0.1.post1`` wheel as a zip; at most 300 rows per task
``chatterbot_en``              consecutive question -> answer pairs of the chatterbot English corpus
=============================  ==================================================================

FederatedScope-LLM compatibility (``federatedscope/llm/dataloader/dataloader.py``,
branch ``llm``): the name before ``@`` is joined to ``data.root`` with
``os.path.join``; ``.json`` files are one JSON list, ``.jsonl`` files hold one
object per line; only the four keys are read and other keys are ignored. Where
FederatedScope-LLM turns a missing ``input`` or ``category`` into ``None``, this
reader gives ``""``. Unlike FederatedScope-LLM, it skips blank lines in JSON lines
files and it rejects (with one line naming the file, the row and the problem)
rows without a non-empty string ``instruction`` and ``output``, non-string
``input``/``category`` values, and files that are missing, empty, not UTF-8 or
not valid JSON. Rows are numbered from 1 (for JSON lines, the row number is the
line number).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fs_gmfl.config.schema import PACKAGED_INSTRUCTION_DATA, is_instruction_data_type
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.common.corpus import find_package_file, search_dirs


@dataclass(frozen=True)
class InstructionRow:
    """One instruction-tuning example."""

    instruction: str
    input: str        # "" when absent
    output: str
    category: str     # "" when absent


@dataclass
class InstructionSet:
    """Rows of one instruction dataset and where they came from."""

    name: str
    rows: list[InstructionRow]
    source: str       # human-readable provenance (file, package, tasks)


#: suffix of FederatedScope-LLM dataset names (``data.type: '<name>@llm'``).
LLM_SUFFIX = "@llm"
FIELDS = ("instruction", "input", "output", "category")

# ---------------------------------------------------------------------------------------------
# packaged datasets
# ---------------------------------------------------------------------------------------------
EVALS_VERSION = "3.0.1.post1"
EVALS_WHEEL = f"evals-{EVALS_VERSION}-py3-none-any.whl"
EVALS_DATA_PREFIX = "evals/registry/data/"
#: ``evals_math`` tasks: (category = task directory, samples file inside it). Chosen by the data alone:
#: English, numeric or yes/no reasoning, >= 100 samples, every sample a zero-shot [system, user] chat,
#: every ``ideal`` a number, bracketed number or one word of <= 20 characters, prompts <= 200 tokens.
EVALS_MATH_TASKS: tuple[tuple[str, str], ...] = (
    ("matrix_mult_rows", "samples.jsonl"),
    ("math_equations", "math_equations.jsonl"),
    ("next-val-series", "next-val-series.jsonl"),
    ("positive-binary-operations", "samples.jsonl"),
    ("probability_questions", "probability_questions.jsonl"),
    ("rectangles", "samples.jsonl"),
    ("recurrence-relation", "samples.jsonl"),
    ("which_is_heavier", "which_is_heavier.jsonl"),
)
#: rows kept per ``evals_math`` task (the larger tasks have 2,000 and 10,000 samples).
EVALS_MATH_ROWS_PER_TASK = 300

CHATTERBOT_VERSION = "1.3.3"
CHATTERBOT_ENGLISH = "data/english"
#: the chatterbot English files (chatterbot-corpus 1.3.3), one category each.
CHATTERBOT_EN_FILES = (
    "ai", "botprofile", "coding", "computers", "conversations", "emotion", "food", "gossip", "greetings",
    "health", "history", "humor", "literature", "money", "movies", "politics", "psychology", "science",
    "sports", "tech_support", "trivia",
)

#: packaged instruction sets; the config layer owns the list so it can resolve ``model.task`` without reading data.
PACKAGED = PACKAGED_INSTRUCTION_DATA
#: True for the packaged instruction datasets and every FederatedScope-LLM ``'<name>@llm'`` type (an unsupported
#: one, e.g. FederatedScope-LLM's downloaded ``alpaca@llm``, gets :func:`read_instruction_set`'s error rather than
#: the classification datasets' one).
is_instruction_data = is_instruction_data_type


def read_instruction_set(data_type: str, root: str) -> InstructionSet:
    """Read the instruction dataset named by ``data.type``.

    Args:
        data_type: ``'<file>.jsonl@llm'``, ``'<file>.json@llm'``, ``evals_math`` or ``chatterbot_en``.
        root: ``data.root``: base directory of relative FederatedScope-LLM files, and the first
            directory searched for packaged data.

    Raises:
        ConfigError: unknown ``data.type`` or a FederatedScope-LLM file that does not exist.
        InputError: unreadable or malformed data, or packaged data not installed.
    """
    if data_type == "evals_math":
        return read_evals_math(root)
    if data_type == "chatterbot_en":
        return read_chatterbot_en(root)
    name = data_type[: -len(LLM_SUFFIX)] if data_type.endswith(LLM_SUFFIX) else ""
    if name.endswith((".json", ".jsonl")):
        return read_fs_llm_file(data_type, os.path.join(root, name))
    raise ConfigError("data.type", data_type,
                      "evals_math, chatterbot_en, or a local FederatedScope-LLM file '<file>.jsonl@llm' / "
                      "'<file>.json@llm' (hub datasets such as alpaca@llm are downloaded at run time and "
                      "are not supported offline)")


# ---------------------------------------------------------------------------------------------
# FederatedScope-LLM files
# ---------------------------------------------------------------------------------------------
def read_fs_llm_file(data_type: str, path_text: str) -> InstructionSet:
    """Rows of a FederatedScope-LLM ``.json`` (one list) or ``.jsonl`` (one object a line) file."""
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError("data.type", data_type, f"an existing file; '{path}' not found")
    text = _read_utf8(path)
    if not text.strip():
        raise InputError(f"instruction file '{path}' is empty")
    if path.name.endswith(".jsonl"):
        records = _parse_json_lines(path, text)
    else:
        records = _parse_json_list(path, text)
    rows = [row_from_record(record, f"instruction file '{path}' row {number}") for number, record in records]
    if not rows:
        raise InputError(f"instruction file '{path}' contains no rows")
    kind = "JSON lines" if path.name.endswith(".jsonl") else "JSON"
    return InstructionSet(path.name.rsplit(".", 1)[0], rows, f"FederatedScope-LLM {kind} file {path}")


def _read_utf8(path: Path) -> str:
    """The file's text; a byte-order mark is dropped. Not UTF-8 -> InputError naming the line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"instruction file '{path}' cannot be read: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"instruction file '{path}' row {line} is not UTF-8 text "
                         f"(byte {data[err.start]:#04x} at offset {err.start})") from None


def _parse_json_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise InputError(f"instruction file '{path}' row {number} is not valid JSON: {err.msg} "
                             f"at column {err.colno}") from None
    return records


def _parse_json_list(path: Path, text: str) -> list[tuple[int, Any]]:
    """``(row number, value)`` of every element of the file's top-level JSON list."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"instruction file '{path}' is not valid JSON: {err.msg} at line {err.lineno} "
                         f"column {err.colno}") from None
    if not isinstance(value, list):
        raise InputError(f"instruction file '{path}' must hold a JSON list of row objects, "
                         f"found a JSON {_json_kind(value)}")
    return list(enumerate(value, start=1))


def _json_kind(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def row_from_record(record: Any, where: str) -> InstructionRow:
    """An :class:`InstructionRow` from one FederatedScope-LLM record.

    ``instruction`` and ``output`` must be non-empty strings; ``input`` and
    ``category`` may be absent or null (then ``""``) but otherwise must be strings.

    Args:
        record: the parsed JSON value.
        where: prefix of error messages, e.g. ``"instruction file 'a.jsonl' row 3"``.
    """
    if not isinstance(record, dict):
        raise InputError(f"{where} is a JSON {_json_kind(record)}, expected an object with "
                         f"'instruction' and 'output'")
    values = {}
    for key in FIELDS:
        value = record.get(key)
        required = key in ("instruction", "output")
        if value is None and required:
            raise InputError(f"{where} has no '{key}'")
        if value is not None and not isinstance(value, str):
            raise InputError(f"{where}: '{key}' must be a string, found a JSON {_json_kind(value)}")
        if required and not value.strip():
            raise InputError(f"{where}: '{key}' is empty")
        values[key] = value or ""
    return InstructionRow(**values)


def write_instruction_jsonl(instruction_set: InstructionSet, path: str | Path) -> Path:
    """Write rows as FederatedScope-LLM JSON lines (readable as ``data.type: '<path>@llm'``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in instruction_set.rows:
            fh.write(json.dumps({k: getattr(row, k) for k in FIELDS}, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# OpenAI evals (read from the wheel)
# ---------------------------------------------------------------------------------------------
def find_evals_wheel(root: str) -> Path:
    """The ``evals`` wheel in ``data.root``, ``$FS_GMFL_DATA`` or ``<sys.prefix>/share/fs_gmfl/data``."""
    for base in search_dirs(root):
        candidate = base / EVALS_WHEEL
        if candidate.is_file():
            return candidate
    raise InputError(f"{EVALS_WHEEL} not found under data.root '{root}', $FS_GMFL_DATA or the installed data "
                     f"directory; download it with: pip download --no-deps evals=={EVALS_VERSION} -d {root} "
                     f"(or: bash scripts/install.sh --llm)")


def chat_to_row(messages: Any, ideal: Any, category: str) -> InstructionRow | None:
    """Convert one evals chat sample to an Alpaca-style row, or ``None`` if it does not fit.

    Rule: the ``system`` messages (joined by newlines) become ``instruction`` and the
    ``user`` messages become ``input``; a sample without a system message uses its
    user text as ``instruction`` and ``input = ""``. ``output`` is ``ideal`` (the
    first entry when it is a list), stripped. Samples with assistant turns (few-shot
    chats), non-string contents or an empty answer give ``None``.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    if any(m.get("role") not in ("system", "user") or not isinstance(m.get("content"), str) for m in messages):
        return None
    system = "\n".join(m["content"].strip() for m in messages if m["role"] == "system")
    user = "\n".join(m["content"].strip() for m in messages if m["role"] == "user")
    answer = ideal[0] if isinstance(ideal, list) and ideal else ideal
    if not isinstance(answer, str) or not answer.strip() or not (system or user):
        return None
    if not system:
        system, user = user, ""
    return InstructionRow(system, user, answer.strip(), category)


def stable_subset(count: int, cap: int, key: str) -> list[int]:
    """Indices of ``min(count, cap)`` rows, in file order, chosen by a keyed hash.

    Row ``i`` is ranked by ``sha256(f"{key}:{i}")``; the ``cap`` lowest are kept.
    The choice depends only on ``key``, ``count`` and ``cap`` (no RNG state or
    Python version), so every run and machine selects the same rows.
    """
    if count <= cap:
        return list(range(count))
    ranked = sorted(range(count), key=lambda i: hashlib.sha256(f"{key}:{i}".encode()).hexdigest())
    return sorted(ranked[:cap])


def read_evals_task(wheel: zipfile.ZipFile, task: str, member: str, where: str) -> list[InstructionRow]:
    """All convertible rows of one evals task, in file order."""
    name = f"{EVALS_DATA_PREFIX}{task}/{member}"
    try:
        text = wheel.read(name).decode("utf-8")
    except KeyError:
        raise InputError(f"{where} lacks {name}; is it evals=={EVALS_VERSION}?") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where} {name} row {number} is not valid JSON: {err.msg}") from None
        row = chat_to_row(sample.get("input"), sample.get("ideal"), task) if isinstance(sample, dict) else None
        if row is not None:
            rows.append(row)
    return rows


def read_evals_math(root: str) -> InstructionSet:
    """``evals_math``: :data:`EVALS_MATH_TASKS`, at most :data:`EVALS_MATH_ROWS_PER_TASK` rows each."""
    path = find_evals_wheel(root)
    where = f"evals wheel '{path}'"
    try:
        with zipfile.ZipFile(path) as wheel:
            rows: list[InstructionRow] = []
            for task, member in EVALS_MATH_TASKS:
                task_rows = read_evals_task(wheel, task, member, where)
                keep = stable_subset(len(task_rows), EVALS_MATH_ROWS_PER_TASK, f"evals_math:{task}")
                rows.extend(task_rows[i] for i in keep)
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as err:
        raise InputError(f"{where} cannot be read: {err}") from None
    tasks = ", ".join(task for task, _ in EVALS_MATH_TASKS)
    return InstructionSet("evals_math", rows, f"OpenAI evals {EVALS_VERSION} wheel {path}: tasks {tasks} "
                          f"(at most {EVALS_MATH_ROWS_PER_TASK} rows each, sha256-ranked)")


# ---------------------------------------------------------------------------------------------
# chatterbot corpus
# ---------------------------------------------------------------------------------------------
def conversation_pairs(conversation: Sequence[Any]) -> Iterable[tuple[str, str]]:
    """Consecutive ``(statement, reply)`` pairs of one conversation: ``[a, b, c]`` -> ``(a, b), (b, c)``."""
    texts = [t.strip() if isinstance(t, str) else "" for t in conversation]
    for question, answer in zip(texts, texts[1:]):
        if question and answer:
            yield question, answer


def _find_chatterbot_file(stem: str, root: str) -> Path:
    try:
        return find_package_file("chatterbot_corpus", f"{CHATTERBOT_ENGLISH}/{stem}.yml", root)
    except InputError:
        raise InputError(f"chatterbot file chatterbot_corpus/{CHATTERBOT_ENGLISH}/{stem}.yml not found under "
                         f"data.root '{root}', $FS_GMFL_DATA or installed packages; install it with: pip install "
                         f"--no-deps --target {root} chatterbot-corpus=={CHATTERBOT_VERSION} "
                         f"(or: bash scripts/install.sh --llm)") from None


def read_chatterbot_en(root: str) -> InstructionSet:
    """``chatterbot_en``: every consecutive Q->A pair; ``category`` is the file stem.

    Rows are ``instruction = question``, ``input = ""``, ``output = reply``. The YAML
    is read with PyYAML's ``BaseLoader`` so every scalar stays a string (``yes`` is
    not turned into ``True``).
    """
    rows: list[InstructionRow] = []
    folder = None
    for stem in CHATTERBOT_EN_FILES:
        path = _find_chatterbot_file(stem, root)
        folder = path.parent
        try:
            with open(path, encoding="utf-8") as fh:
                document = yaml.load(fh, Loader=yaml.BaseLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise InputError(f"chatterbot file '{path}' cannot be read: {str(err).splitlines()[0]}") from None
        conversations = document.get("conversations") if isinstance(document, dict) else None
        if not isinstance(conversations, list):
            raise InputError(f"chatterbot file '{path}' has no 'conversations' list")
        for conversation in conversations:
            if isinstance(conversation, list):
                rows.extend(InstructionRow(q, "", a, stem) for q, a in conversation_pairs(conversation))
    source = f"chatterbot-corpus {CHATTERBOT_VERSION} English, {len(CHATTERBOT_EN_FILES)} files in {folder}"
    return InstructionSet("chatterbot_en", rows, source)
