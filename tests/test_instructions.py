"""Instruction-data readers: FederatedScope-LLM files, the packaged evals_math and chatterbot_en sets."""

from __future__ import annotations

import hashlib
import json
import operator
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.common import instructions
from fs_gmfl.hosts.common.corpus import search_dirs
from fs_gmfl.hosts.common.instructions import (EVALS_MATH_TASKS, EVALS_WHEEL, InstructionRow, chat_to_row,
                                               conversation_pairs, is_instruction_data, read_instruction_set,
                                               stable_subset, write_instruction_jsonl)

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5", "category": "math"},
    {"instruction": "Say hi.", "output": "hi"},
    {"instruction": "Name a colour.", "input": None, "output": "red", "category": None, "extra": 1},
]
EXPECTED = [
    InstructionRow("Add the numbers.", "2 3", "5", "math"),
    InstructionRow("Say hi.", "", "hi", ""),
    InstructionRow("Name a colour.", "", "red", ""),
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# data.type recognition
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data_type, expected", [
    ("evals_math", True), ("chatterbot_en", True), ("train.jsonl@llm", True), ("/abs/train.json@llm", True),
    ("alpaca@llm", True), ("rotten_tomatoes", False), ("news_articles", False), ("synthetic", False),
    ("jsonl:rows.jsonl", False), ("train.jsonl", False),
])
def test_is_instruction_data(data_type, expected):
    assert is_instruction_data(data_type) is expected


@pytest.mark.parametrize("data_type", ["alpaca@llm", "gsm8k@llm", "rows.csv@llm", "rotten_tomatoes"])
def test_unsupported_type_is_a_config_error_naming_data_type(tmp_path, data_type):
    with pytest.raises(ConfigError, match="data.type") as info:
        read_instruction_set(data_type, str(tmp_path))
    assert "\n" not in str(info.value) and data_type in str(info.value)


# ---------------------------------------------------------------------------------------------
# FederatedScope-LLM files
# ---------------------------------------------------------------------------------------------
def test_jsonl_relative_to_root_gives_the_expected_rows(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    got = read_instruction_set("train.jsonl@llm", str(tmp_path))
    assert got.rows == EXPECTED
    assert got.name == "train"
    assert str(tmp_path / "train.jsonl") in got.source


def test_json_list_and_absolute_path(tmp_path):
    path = tmp_path / "sub" / "rows.json"
    path.parent.mkdir()
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    got = read_instruction_set(f"{path}@llm", "/nonexistent-root")
    assert got.rows == EXPECTED


def test_jsonl_skips_blank_lines_and_accepts_a_bom(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1])).encode())
    assert read_instruction_set("t.jsonl@llm", str(tmp_path)).rows == EXPECTED[:2]


def test_non_ascii_text_round_trips_through_the_writer(tmp_path):
    source = instructions.InstructionSet("x", [InstructionRow("Übersetze", "café", "咖啡", "zh")], "test")
    path = write_instruction_jsonl(source, tmp_path / "out" / "x.jsonl")
    assert read_instruction_set(f"{path}@llm", "unused").rows == source.rows


BAD_ROWS = [
    ({"input": "x", "output": "y"}, "row 2 has no 'instruction'"),
    ({"instruction": "x"}, "row 2 has no 'output'"),
    ({"instruction": None, "output": "y"}, "row 2 has no 'instruction'"),
    ({"instruction": "x", "output": 5}, "row 2: 'output' must be a string, found a JSON number"),
    ({"instruction": ["x"], "output": "y"}, "row 2: 'instruction' must be a string, found a JSON list"),
    ({"instruction": "x", "input": 3, "output": "y"}, "row 2: 'input' must be a string"),
    ({"instruction": "x", "output": "y", "category": True}, "row 2: 'category' must be a string, found a JSON boolean"),
    ({"instruction": "x", "output": "  "}, "row 2: 'output' is empty"),
    ({"instruction": "", "output": "y"}, "row 2: 'instruction' is empty"),
    (["x", "y"], "row 2 is a JSON list, expected an object"),
    ("text", "row 2 is a JSON string, expected an object"),
]


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_bad_row_is_one_line_naming_file_and_row(tmp_path, suffix, bad, message):
    records = [ROWS[0], bad, ROWS[1]]
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, records)
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(InputError) as info:
        read_instruction_set(f"d.{suffix}@llm", str(tmp_path))
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


@pytest.mark.parametrize("name, content, message", [
    ("e.jsonl", b"", "is empty"),
    ("e.json", b"  \n\t\n", "is empty"),
    ("e.json", b"[]", "contains no rows"),
    ("e.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a", \n', "row 2 is not valid JSON"),
    ("e.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": }]',
     "is not valid JSON: Expecting value at line 2"),
    ("e.json", b'{"instruction": "a", "output": "b"}', "must hold a JSON list of row objects, found a JSON object"),
    ("e.json", b'"just text"', "found a JSON string"),
    ("e.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
     "row 2 is not UTF-8 text (byte 0xe9"),
])
def test_bad_file_is_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError) as info:
        read_instruction_set(f"{name}@llm", str(tmp_path))
    assert message in str(info.value) and str(tmp_path / name) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_config_error_naming_data_type_and_path(tmp_path):
    with pytest.raises(ConfigError) as info:
        read_instruction_set("nope.jsonl@llm", str(tmp_path))
    text = str(info.value)
    assert "data.type" in text and "nope.jsonl@llm" in text and str(tmp_path / "nope.jsonl") in text


def test_a_directory_is_not_a_file(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ConfigError, match="not found"):
        read_instruction_set("dir.jsonl@llm", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# conversion rules
# ---------------------------------------------------------------------------------------------
def test_chat_to_row_system_becomes_instruction_user_becomes_input():
    messages = [{"role": "system", "content": " Answer with a number. "}, {"role": "user", "content": "2+2"}]
    assert chat_to_row(messages, " 4 ", "t") == InstructionRow("Answer with a number.", "2+2", "4", "t")
    assert chat_to_row(messages, ["[4]", "[4.0]"], "t").output == "[4]"
    only_user = [{"role": "user", "content": "Say yes."}]
    assert chat_to_row(only_user, "yes", "t") == InstructionRow("Say yes.", "", "yes", "t")
    two_system = [{"role": "system", "content": "A."}, {"role": "system", "content": "B."}, *messages[1:]]
    assert chat_to_row(two_system, "4", "t").instruction == "A.\nB."


@pytest.mark.parametrize("messages, ideal", [
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
      {"role": "user", "content": "q2"}], "x"),                        # few-shot chat
    ([{"role": "user", "content": "q"}], ""),                          # empty answer
    ([{"role": "user", "content": "q"}], []),                          # empty list
    ([{"role": "user", "content": "q"}], 4),                           # not a string
    ("plain prompt", "x"),                                             # not a chat
    ([{"role": "user", "content": ["q"]}], "x"),                       # content not a string
])
def test_chat_to_row_rejects_what_does_not_fit(messages, ideal):
    assert chat_to_row(messages, ideal, "t") is None


def test_stable_subset_keeps_the_lowest_hashes_in_file_order():
    ranks = {i: hashlib.sha256(f"k:{i}".encode()).hexdigest() for i in range(6)}
    expected = sorted(sorted(ranks, key=ranks.get)[:3])
    assert stable_subset(6, 3, "k") == expected
    assert stable_subset(4, 10, "k") == [0, 1, 2, 3]
    assert stable_subset(1000, 50, "a") != stable_subset(1000, 50, "b")


def test_conversation_pairs_are_consecutive():
    assert list(conversation_pairs(["a", " b ", "c"])) == [("a", "b"), ("b", "c")]
    assert list(conversation_pairs(["only"])) == []
    assert list(conversation_pairs(["a", "", "c"])) == []


# ---------------------------------------------------------------------------------------------
# evals_math from a hand-made wheel (no installed data needed)
# ---------------------------------------------------------------------------------------------
def fake_evals_wheel(directory: Path, per_task: int) -> Path:
    """A zip laid out like the evals wheel: task t's row i asks 'i+i' and answers str(2*i)."""
    path = directory / EVALS_WHEEL
    with zipfile.ZipFile(path, "w") as zf:
        for task, member in EVALS_MATH_TASKS:
            lines = [json.dumps({"input": [{"role": "system", "content": f"Task {task}."},
                                           {"role": "user", "content": f"{i}+{i}"}], "ideal": str(2 * i)})
                     for i in range(per_task)]
            lines.append(json.dumps({"input": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                     "ideal": "dropped"}))
            zf.writestr(f"evals/registry/data/{task}/{member}", "\n".join(lines) + "\n")
    return path


def test_evals_math_from_a_fake_wheel_caps_each_task_deterministically(tmp_path, monkeypatch):
    monkeypatch.setattr(instructions, "EVALS_MATH_ROWS_PER_TASK", 7)
    fake_evals_wheel(tmp_path, per_task=20)
    got = read_instruction_set("evals_math", str(tmp_path))
    counts = Counter(r.category for r in got.rows)
    assert counts == {task: 7 for task, _ in EVALS_MATH_TASKS}
    for task, _ in EVALS_MATH_TASKS:
        rows = [r for r in got.rows if r.category == task]
        kept = [int(r.input.split("+")[0]) for r in rows]
        assert kept == stable_subset(20, 7, f"evals_math:{task}")
        assert all(r.instruction == f"Task {task}." and r.output == str(2 * i) for r, i in zip(rows, kept))
    assert read_instruction_set("evals_math", str(tmp_path)).rows == got.rows


def test_evals_wheel_missing_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(instructions, "search_dirs", lambda root: [Path(root)])
    with pytest.raises(InputError, match=r"pip download --no-deps evals==3\.0\.1\.post1 -d"):
        read_instruction_set("evals_math", str(tmp_path))


def test_evals_wheel_damaged_is_one_line(tmp_path):
    (tmp_path / EVALS_WHEEL).write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot be read") as info:
        read_instruction_set("evals_math", str(tmp_path))
    assert "\n" not in str(info.value)


def test_chatterbot_missing_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr("fs_gmfl.hosts.common.corpus.search_dirs", lambda root: [Path(root)])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"chatterbot-corpus==1\.3\.3"):
        read_instruction_set("chatterbot_en", str(tmp_path))


def test_chatterbot_reads_yaml_scalars_as_text(tmp_path):
    folder = tmp_path / "chatterbot_corpus" / "data" / "english"
    folder.mkdir(parents=True)
    for stem in instructions.CHATTERBOT_EN_FILES:
        (folder / f"{stem}.yml").write_text("categories:\n- x\nconversations: []\n", encoding="utf-8")
    (folder / "ai.yml").write_text("conversations:\n- - Are you a robot?\n  - yes\n  - 12\n- not a list\n",
                                   encoding="utf-8")
    got = read_instruction_set("chatterbot_en", str(tmp_path))
    assert got.rows == [InstructionRow("Are you a robot?", "", "yes", "ai"), InstructionRow("yes", "", "12", "ai")]
    (folder / "food.yml").write_text("categories:\n- food\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"food\.yml' has no 'conversations' list"):
        read_instruction_set("chatterbot_en", str(tmp_path))
    (folder / "food.yml").write_text("conversations: [unclosed\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"food\.yml' cannot be read") as info:
        read_instruction_set("chatterbot_en", str(tmp_path))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# the real packaged data
# ---------------------------------------------------------------------------------------------
def _installed(relpath: str) -> bool:
    return any((base / relpath).is_file() for base in search_dirs("data"))


needs_evals = pytest.mark.skipif(not _installed(EVALS_WHEEL),
                                 reason=f"{EVALS_WHEEL} not installed (bash scripts/install.sh --llm)")
needs_chatterbot = pytest.mark.skipif(not _installed("chatterbot_corpus/data/english/ai.yml"),
                                      reason="chatterbot-corpus not installed (bash scripts/install.sh --llm)")

#: rows per task measured on evals 3.0.1.post1 (positive-binary-operations and recurrence-relation capped at 300).
EVALS_MATH_COUNTS = {
    "matrix_mult_rows": 120, "math_equations": 100, "next-val-series": 100, "positive-binary-operations": 300,
    "probability_questions": 100, "rectangles": 200, "recurrence-relation": 300, "which_is_heavier": 183,
}


@needs_evals
def test_evals_math_real_rows():
    got = read_instruction_set("evals_math", "data")
    assert Counter(r.category for r in got.rows) == EVALS_MATH_COUNTS
    assert len(got.rows) == 1403
    assert all(r.output and len(r.output) <= 20 and r.instruction and r.input for r in got.rows)
    assert all(len(r.instruction) + len(r.input) <= 800 for r in got.rows)
    yes_no = Counter(r.output for r in got.rows if r.category in ("rectangles", "which_is_heavier"))
    assert yes_no == {"Yes": 187, "No": 196}


@needs_evals
def test_evals_binary_operations_answers_match_their_questions():
    """Every kept binary-arithmetic row is paired with its own answer: recompute it from the input."""
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv}
    rows = [r for r in read_instruction_set("evals_math", "data").rows if r.category == "positive-binary-operations"]
    for row in rows:
        left, op, right = row.input.split()
        assert str(ops[op](int(left, 2), int(right, 2))) == row.output, row
    assert rows[0] == InstructionRow(
        "You are a binary calculator that returns the answer in decimal (ONLY reply with the number)",
        "0001011100000 // 01011", "66", "positive-binary-operations")


@needs_chatterbot
def test_chatterbot_en_real_rows():
    got = read_instruction_set("chatterbot_en", "data")
    counts = Counter(r.category for r in got.rows)
    assert len(got.rows) == 2306 and len(counts) == 21
    assert counts["tech_support"] == 1050 and counts["trivia"] == 260 and counts["health"] == 8
    assert all(r.instruction and r.output and r.input == "" for r in got.rows)
    assert max(len(r.output) for r in got.rows) <= 1100
    assert got.rows[0] == InstructionRow(
        "What is AI?", "", "Artificial Intelligence is the branch of engineering and science devoted to "
        "constructing machines that think.", "ai")
