"""Reliability, round two: bad input of every kind ends in one line and exit code 2, before anything is allocated.

Issue #14, scope items 1-5: options anywhere on the command line; NaN and infinities in every numeric key;
configurations that cannot fit the machine (sequence length, LoRA rank, clients x samples, batch x length,
model size); unusable files (configuration, data, model directory, outdir, expname, checkpoint pointer); unsafe
YAML (duplicate keys, alias bombs, deep nesting); data that cannot be trained or evaluated. Every table row runs
``fs_gmfl.cli.main`` in-process and checks: exit code 2, exactly one stderr line starting ``fs-gmfl``, the key or
file named, the expected fragment, and no ``summary.json``. A few rows also run as real processes (no traceback,
bounded time). Run-directory behaviour (locks, overwrite, resume, signals, strict JSON) is in
``tests/test_run_directories.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from fs_gmfl.cli import main
from fs_gmfl.config.fields import iter_keys
from fs_gmfl.config.schema import RunConfig

pytestmark = pytest.mark.usefixtures("single_thread")

#: a tiny valid run; each row appends its bad settings (later overrides win).
BASE = ["model.type", "tiny_bert", "model.hidden_size", "16", "model.vocab_size", "200", "data.type", "synthetic",
        "data.synthetic_num_samples", "40", "federate.client_num", "2", "federate.total_round_num", "1",
        "llm.tok_len", "8"]
HAFL = ["federate.method", "hafl"]
HFT = ["federate.method", "fedhft", "fedhft.eval", "global"]
KRSO = ["federate.method", "fedkrso"]
BILLION_LAUGHS = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """``main(argv)`` in-process (argparse's SystemExit included): exit code and the non-empty stderr lines."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def assert_one_line(code: int, lines: list[str], *fragments: str) -> None:
    """Exit 2 and one stderr line holding every fragment."""
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("fs-gmfl"), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# -- 1. options anywhere on the command line --------------------------------------------------------------------
CLI_ROWS = [
    # (argv after 'run --cfg /dev/null' unless it starts with a sub-command, fragments)
    ([*BASE, "federate.save_freq"], ["'federate.save_freq'", "this key has no value"]),
    ([*BASE, "federate.save_freq", "--resume"], ["'federate.save_freq'", "this key has no value"]),
    ([*BASE, "--bogus", "1"], ["unknown option '--bogus'", "--resume"]),
    ([*BASE, "--quite"], ["unknown option '--quite'"]),
    ([*BASE, "--cfg"], ["option '--cfg' of 'run' needs a value"]),
    ([*BASE, "--cfg", "--quiet"], ["option '--cfg' of 'run' needs a value"]),
    # no --cfg at all: argparse's own error, on one line
    (["@run", "outdir", "/nonexistent", *BASE], ["fs-gmfl run: error:", "--cfg"]),
    (["@comm", *BASE, "--cfg"], ["option '--cfg' of 'comm' needs a value"]),
    (["@comm", "--cfg", "/dev/null", *BASE, "--resume"], ["unknown option '--resume' for 'comm'"]),
    (["@keys", "nosuchsection"], ["no configuration key under 'nosuchsection'", "gmfl"]),
    (["@frobnicate"], ["invalid choice: 'frobnicate'"]),
]


@pytest.mark.parametrize("argv,fragments", CLI_ROWS, ids=[f"cli{i:02d}" for i in range(len(CLI_ROWS))])
def test_command_line_mistakes_exit_2_with_one_line(argv, fragments, tmp_path, capsys):
    """A key without value, an unknown option, an option without value, a missing --cfg: one line, exit 2."""
    if argv[0].startswith("@"):
        full = [argv[0][1:], *argv[1:]]
    else:
        full = ["run", "--cfg", "/dev/null", "outdir", str(tmp_path), *argv]
    code, lines = run_cli(full, capsys)
    assert_one_line(code, lines, *fragments)
    assert not list(tmp_path.rglob("summary.json"))


def test_options_after_the_overrides_are_options(tmp_path, capsys):
    """``--quiet`` and ``--cfg`` after the overrides work; ``--overwrite`` as well (README's placement)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("federate:\n  total_round_num: 1\n", encoding="utf-8")
    code, lines = run_cli(["run", *BASE, "outdir", str(tmp_path), "--cfg", str(cfg), "--quiet"], capsys)
    assert code == 0, lines
    assert lines == []  # --quiet was honoured: no final line
    assert json.loads((tmp_path / "fedit" / "summary.json").read_text())["rounds"] == 1
    code, lines = run_cli(["run", "--cfg=" + str(cfg), *BASE, "outdir", str(tmp_path), "--overwrite", "--quiet"],
                          capsys)
    assert code == 0, lines


def test_comm_accepts_cfg_after_the_overrides(capsys):
    """``fs-gmfl comm KEY VALUE ... --cfg F`` prints the estimate."""
    code = main(["comm", *BASE, "--cfg", "/dev/null"])
    out = capsys.readouterr().out
    assert code == 0
    assert "uplink" in out or "bytes" in out


# -- 2. non-finite numbers: every numeric key ------------------------------------------------------------------
def _numeric_keys() -> list[tuple[str, str]]:
    """``(key, YAML value)``: every float key (and float list) of the schema with a NaN/inf probe."""
    keys = []
    for key, default, _, meta, tp in iter_keys(RunConfig):
        if tp is float:
            keys.append((key, "scalar"))
        elif typing.get_origin(tp) is list and typing.get_args(tp) == (float,):
            keys.append((key, "list"))
    return keys


NUMERIC_KEYS = _numeric_keys()
NONFINITE = [(key, kind, probe) for key, kind in NUMERIC_KEYS for probe in (".nan", ".inf", "-.inf")]


def test_the_numeric_sweep_covers_the_method_subtrees():
    """The sweep is not vacuous: it reaches float keys of FederatedScope sections and of method subtrees."""
    sections = {key.split(".")[0] for key, _ in NUMERIC_KEYS}
    assert {"train", "data", "gmfl", "grad", "faults", "federate"} <= sections, sections
    assert len(NUMERIC_KEYS) >= 15


@pytest.mark.parametrize("key,kind,probe", NONFINITE, ids=[f"{k}={p}" for k, _, p in NONFINITE])
def test_every_float_key_rejects_nan_and_infinities(key, kind, probe, tmp_path, capsys):
    """``KEY .nan``/``.inf``/``-.inf`` (a list element for list keys): one line naming the key, exit 2."""
    value = f"[0.5, {probe}, 0.5]" if kind == "list" else probe
    code, lines = run_cli(["run", "--cfg", "/dev/null", "--quiet", *BASE, "outdir", str(tmp_path), key, value],
                          capsys)
    assert_one_line(code, lines, f"'{key}'")
    assert "finite" in lines[0]


#: (overrides, key named, fragment): non-finite values inside lists of mappings and free-form mappings,
#: overflowing literals, and the issue's examples.
NONFINITE_NESTED = [
    (["llm.adapter.args", "[{lora_alpha: .nan}]"], "llm.adapter.args", "llm.adapter.args[0].lora_alpha"),
    (["llm.adapter.args", "[{lora_dropout: .inf}]"], "llm.adapter.args", "lora_dropout"),
    (["data.splitter", "lda", "data.splitter_args", "[{alpha: .nan}]"], "data.splitter_args", "alpha"),
    (["data.splitter", "lda", "data.splitter_args", "[{alpha: .inf}]"], "data.splitter_args", "alpha"),
    ([*HAFL, "hafl.profiles", "[{share: .nan, freeze_ratio: 0.5}]"], "hafl.profiles", "share"),
    ([*HAFL, "hafl.profiles", "[{share: 1.0, freeze_ratio: .nan}]"], "hafl.profiles", "freeze_ratio"),
    ([*HFT, "fedhft.levels", "{keep_ratio: [.nan], client_share: [1.0]}"], "fedhft.levels", "keep_ratio"),
    ([*HFT, "fedhft.levels", "{keep_ratio: [0.5], client_share: [.inf]}"], "fedhft.levels", "client_share"),
    (["train.optimizer.lr", "1e999"], "train.optimizer.lr", "finite"),
    (["train.optimizer.lr", "1" + "0" * 400], "train.optimizer.lr", "finite"),
    (["federate.client_num", ".inf"], "federate.client_num", "finite"),
    (["seed", ".nan"], "seed", "finite"),
]


@pytest.mark.parametrize("overrides,key,fragment", NONFINITE_NESTED,
                         ids=[f"nested{i:02d}" for i in range(len(NONFINITE_NESTED))])
def test_nested_and_overflowing_non_finite_values_are_refused(overrides, key, fragment, tmp_path, capsys):
    """NaN/inf inside list elements and mappings, and literals that overflow to inf: one line naming the key."""
    code, lines = run_cli(["run", "--cfg", "/dev/null", "--quiet", *BASE, "outdir", str(tmp_path), *overrides],
                          capsys)
    assert_one_line(code, lines, f"'{key}", fragment)


# -- 2. resource pre-flight --------------------------------------------------------------------------------------
RESOURCE_ROWS = [
    (["llm.tok_len", "1000000000"], "llm.tok_len", "lower llm.tok_len"),
    (["model.type", "tiny_llama", "llm.tok_len", "1000000000"], "llm.tok_len", "attention scores"),
    (["model.type", "tiny_gpt2", "llm.tok_len", "100000000"], "llm.tok_len", "of memory"),
    (["llm.adapter.args", "[{r: 100000000}]"], "llm.adapter.args[0].r", "at most min(d_in, d_out) = 16"),
    (["llm.adapter.args", "[{r: 17}]"], "llm.adapter.args[0].r", "'bert.encoder.layer.0.attention.self.query'"),
    (["model.type", "tiny_gpt2", "llm.adapter.args", "[{r: 17}]"], "llm.adapter.args[0].r", "16 -> 48"),
    ([*KRSO, "llm.adapter.args", "[{r: 1000}]"], "llm.adapter.args[0].r", "at most min(d_in, d_out)"),
    ([*HFT, "llm.adapter.args", "[{r: 1000}]"], "llm.adapter.args[0].r", "at most min(d_in, d_out)"),
    (["federate.client_num", "100000", "data.splitter", "lda"], "federate.client_num", "at most 32 clients"),
    (["federate.client_num", "100000"], "federate.client_num", "at most the 32 training examples"),
    (["federate.client_num", "8", "data.splitter", "lda", "data.splitter_args", "[{min_size: 5}]"],
     "federate.client_num", "min_size 5"),
    (["dataloader.batch_size", "100000000", "data.synthetic_num_samples", "100000000"], "dataloader.batch_size",
     "activations of a 100000000 x 8-token training batch"),
    (["eval.batch_size", "100000000", "data.synthetic_num_samples", "10000000", "llm.tok_len", "64"],
     "eval.batch_size", "evaluation batch"),
    (["model.hidden_size", "1000000"], "model.hidden_size", "transformer blocks"),
    (["model.vocab_size", "100000000000"], "model.vocab_size", "token embeddings"),
    (["data.synthetic_num_samples", "10000000000", "llm.tok_len", "64"], "data.synthetic_num_samples",
     "10000000000 tokenised examples"),
    (["federate.method", "fft", "model.hidden_size", "30000"], "model.hidden_size",
     "transformer blocks with gradients and Adam moments"),
    (["model.type", "minilm", "llm.tok_len", "1000"], "llm.tok_len", "max_position_embeddings (512)"),
]


@pytest.mark.parametrize("overrides,key,fragment", RESOURCE_ROWS,
                         ids=[f"resource{i:02d}" for i in range(len(RESOURCE_ROWS))])
def test_configurations_that_cannot_fit_are_refused_up_front(overrides, key, fragment, tmp_path, capsys):
    """Sequence length, rank, clients x samples, batch x length, model size: one line with the key, in seconds."""
    start = time.monotonic()
    code, lines = run_cli(["run", "--cfg", "/dev/null", "--quiet", *BASE, "outdir", str(tmp_path), *overrides],
                          capsys)
    assert_one_line(code, lines, f"'{key}'", fragment)
    assert time.monotonic() - start < 60
    assert not (tmp_path / "fedit").exists()  # a run refused before it started leaves no directory


def test_memory_budget_comes_from_the_environment(tmp_path, capsys, monkeypatch):
    """``FS_GMFL_MEMORY_BYTES`` bounds the estimate: 1 KiB refuses the tiny run naming the estimate; junk is refused."""
    monkeypatch.setenv("FS_GMFL_MEMORY_BYTES", "1024")
    code, lines = run_cli(["run", "--cfg", "/dev/null", "--quiet", *BASE, "outdir", str(tmp_path)], capsys)
    assert_one_line(code, lines, "but 1.0 KiB is available", "the run needs an estimated")
    monkeypatch.setenv("FS_GMFL_MEMORY_BYTES", "lots")
    code, lines = run_cli(["run", "--cfg", "/dev/null", "--quiet", *BASE, "outdir", str(tmp_path)], capsys)
    assert_one_line(code, lines, "'FS_GMFL_MEMORY_BYTES'", "a whole number of bytes")


def test_estimate_matches_the_hand_computed_bytes():
    """The weight and activation terms equal the formulas in the module docstring for a known shape."""
    from fs_gmfl.config import load_config
    from fs_gmfl.hosts.common.preflight import Shape, estimate_bytes

    cfg = load_config(None, [*BASE, "dataloader.batch_size", "4", "eval.batch_size", "2"])
    shape = Shape(hidden=16, layers=2, heads=2, vocab=200, intermediate=32, positions=None, max_positions=None)
    terms = {t.what: t.nbytes for t in estimate_bytes(cfg, shape, lora_elements=100, rows=40)}
    assert terms["token embeddings"] == 200 * 16 * 4
    assert terms["transformer blocks"] == 2 * (4 * 16 * 16 + 2 * 16 * 32) * 4
    assert terms["LoRA factors with gradients and Adam moments"] == 100 * 4 * 4
    assert terms["activations of a 4 x 8-token training batch"] == 4 * 8 * 16 * 2 * 16 * 4
    assert terms["attention scores of a 4 x 8-token training batch"] == 2 * 4 * 2 * 8 * 8 * 2 * 4
    assert terms["40 tokenised examples of 8 tokens"] == 40 * 8 * 24


# -- 3. files the user names -----------------------------------------------------------------------------------
def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


#: name -> (setup(tmp) -> (cfg path, extra overrides), fragments)
def _cfg_rows() -> dict[str, tuple[typing.Callable[[Path], tuple[str, list[str]]], list[str]]]:
    def cfg_file(text: bytes | str) -> typing.Callable[[Path], tuple[str, list[str]]]:
        return lambda tmp: (str(_write(tmp / "c.yaml", text)), [])

    return {
        "non_utf8": (cfg_file(b"federate:\n  client_num: 2\n# caf\xe9\n"), ["not UTF-8 text", "byte 0xe9"]),
        "utf16_bom": (cfg_file("seed: 1\n".encode("utf-16")), ["not UTF-8 text"]),
        "directory": (lambda tmp: (str(tmp), []), ["is a directory"]),
        "missing": (lambda tmp: (str(tmp / "nope.yaml"), []), ["does not exist"]),
        "nul_in_path": (lambda tmp: (str(tmp / "a\0b.yaml"), []), ["cannot be read"]),
        "duplicate_top": (cfg_file("seed: 1\nfederate:\n  client_num: 2\nseed: 2\n"),
                          ["duplicate key 'seed' (first given at line 1)", "line 4"]),
        "duplicate_section": (cfg_file("federate:\n  client_num: 2\ntrain:\n  local_update_steps: 1\n"
                                       "federate:\n  total_round_num: 1\n"), ["duplicate key 'federate'", "line 5"]),
        "duplicate_nested": (cfg_file("train:\n  optimizer:\n    lr: 0.1\n    lr: 0.2\n"),
                             ["duplicate key 'lr' (first given at line 3)"]),
        "alias_bomb": (cfg_file(BILLION_LAUGHS), ["aliases expand to more than"]),
        "deep_list": (cfg_file("seed: " + "[" * 5000 + "]" * 5000 + "\n"), ["nesting deeper than 64 levels"]),
        "deep_mapping": (cfg_file("".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v\n"),
                         ["nesting deeper than 64 levels"]),
        "recursive_alias": (cfg_file("federate: &f\n  x: *f\n"), ["refers to a node that contains it"]),
        "list_document": (cfg_file("- seed\n- 1\n"), ["must hold a mapping"]),
        "bad_date": (cfg_file("seed: 2020-13-45\n"), ["cannot be read"]),
        "tab_indent": (cfg_file("federate:\n\tclient_num: 2\n"), ["not valid YAML", "line 2"]),
    }


CFG_ROWS = _cfg_rows()


@pytest.mark.parametrize("name", list(CFG_ROWS))
def test_unusable_config_files_exit_2_with_one_line(name, tmp_path, capsys):
    """Non-UTF-8, a directory, duplicate keys, alias bombs, deep nesting ...: one line naming the file, fast."""
    setup, fragments = CFG_ROWS[name]
    path, extra = setup(tmp_path)
    start = time.monotonic()
    code, lines = run_cli(["run", "--cfg", path, "--quiet", *BASE, "outdir", str(tmp_path / "out"), *extra], capsys)
    assert_one_line(code, lines, "config file", *fragments)
    assert time.monotonic() - start < 20
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind,fragment", [("fifo", "is a FIFO (named pipe), not a regular file"),
                                           ("/dev/zero", "is a character device, not a regular file")])
def test_a_config_path_that_is_not_a_regular_file_is_refused_before_reading(kind, fragment, tmp_path):
    """``--cfg`` naming a FIFO (reading blocks until a writer comes) or ``/dev/zero`` (never ends): one line, exit 2,
    at once, as a real process (it would hang before the check, hence the timeout)."""
    path = kind
    if kind == "fifo":
        path = str(tmp_path / "cfg.fifo")
        os.mkfifo(path)
    env = {**os.environ, "FS_GMFL_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "fs_gmfl", "run", "--cfg", path, *BASE, "outdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, env=env)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("fs-gmfl: error: config file"), result.stderr
    assert path in lines[0] and fragment in lines[0]


def test_duplicate_key_in_an_override_value_is_not_silently_merged(tmp_path, capsys):
    """``llm.adapter.args [{r: 4, r: 8}]`` is not read as r 8: the value stays text and is refused by type."""
    code, lines = run_cli(["run", "--cfg", "/dev/null", "--quiet", *BASE, "outdir", str(tmp_path),
                           "llm.adapter.args", "[{r: 4, r: 8}]"], capsys)
    assert_one_line(code, lines, "'llm.adapter.args'", "expected a list")


TINY_BERT_CONFIG = ('{"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, '
                    '"intermediate_size": 32, "vocab_size": 50}')


def _model_dir(tmp: Path, config: str | bytes | None, weights: bool = False, tokenizer: bool = False) -> str:
    d = tmp / "model"
    d.mkdir()
    if config is not None:
        _write(d / "config.json", config)
    if weights:
        _write(d / "model.safetensors", b"not really safetensors")
    if tokenizer:
        _write(d / "vocab.txt", "".join(f"{token}\n" for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a")))
    return str(d)


def _data_file(tmp: Path, name: str, data: bytes | str) -> str:
    return str(_write(tmp / name, data))


#: name -> (setup(tmp) -> overrides, key or file fragment, fragment)
PATH_ROWS: dict[str, tuple[typing.Callable[[Path], list[str]], str, str]] = {
    # outdir and expname
    "outdir_is_file": (lambda t: ["outdir", _data_file(t, "f", "x")], "outdir", "is not a directory"),
    "outdir_under_file": (lambda t: ["outdir", str(Path(_data_file(t, "f", "x")) / "sub")],
                          "cannot create the run directory", "Not a directory"),
    "outdir_in_proc": (lambda t: ["outdir", "/proc/fs_gmfl_nowhere"], "cannot create the run directory", "/proc"),
    "rundir_is_file": (lambda t: ["outdir", str(t), "expname", Path(_data_file(t, "runfile", "x")).name],
                       "run directory", "is not a directory"),
    "outdir_empty": (lambda t: ["outdir", "''"], "'outdir'", "a non-empty directory path"),
    "outdir_nul": (lambda t: ["outdir", "a\0b"], "'outdir'", "without NUL"),
    "expname_300": (lambda t: ["expname", "x" * 300], "'expname'", "at most 200 bytes"),
    "expname_300_bytes_utf8": (lambda t: ["expname", "é" * 120], "'expname'", "at most 200 bytes"),
    "expname_absolute": (lambda t: ["expname", "/tmp/elsewhere"], "'expname'", "no '/'"),
    "expname_parent": (lambda t: ["expname", ".."], "'expname'", "not '.' or '..'"),
    "expname_dot": (lambda t: ["expname", "."], "'expname'", "not '.' or '..'"),
    "expname_nested": (lambda t: ["expname", "a/../../b"], "'expname'", "no '/'"),
    "expname_backslash": (lambda t: ["expname", "a\\b"], "'expname'", "'\\'"),
    "expname_spaces": (lambda t: ["expname", "' run '"], "'expname'", "leading or trailing spaces"),
    # model directories
    "model_config_broken": (lambda t: ["model.type", _model_dir(t, "{not json")], "'model.type'", "valid JSON"),
    "model_config_list": (lambda t: ["model.type", _model_dir(t, "[1, 2]")], "'model.type'", "'model_type'"),
    "model_config_non_utf8": (lambda t: ["model.type", _model_dir(t, b"\xff\xfe{}")], "'model.type'", "valid JSON"),
    "model_no_weights": (lambda t: ["model.type", _model_dir(t, '{"model_type": "bert"}')], "'model.type'",
                         "none found"),
    "model_unknown_type": (lambda t: ["model.type", _model_dir(t, '{"model_type": "nosucharch"}', weights=True)],
                           "'model.type'", "a model transformers can build"),
    "model_no_config": (lambda t: ["model.type", _model_dir(t, None)], "'model.type'", "containing config.json"),
    "model_corrupt_weights": (lambda t: ["model.type", _model_dir(
        t, TINY_BERT_CONFIG, weights=True, tokenizer=True)], "model directory", "cannot be loaded"),
    "model_no_tokenizer": (lambda t: ["model.type", _model_dir(t, TINY_BERT_CONFIG, weights=True)], "'model.type'",
                           "none of tokenizer.json, vocab.txt, vocab.json"),
    # data files
    "data_non_utf8": (lambda t: ["data.type", "csv:" + _data_file(t, "d.csv", b"text,label\ncaf\xe9,a\n")],
                      "data file", "cannot be read"),
    "data_gzip": (lambda t: ["data.type", "csv:" + _data_file(t, "d.csv", __import__("gzip").compress(b"x" * 99))],
                  "data file", "cannot be read"),
    "data_bad_jsonl": (lambda t: ["data.type", "jsonl:" + _data_file(t, "d.jsonl", '{"text": "a", "label": 1}\n{\n')],
                       "data file", "cannot be read"),
    "data_jsonl_list_row": (lambda t: ["data.type", "jsonl:" + _data_file(t, "d.jsonl", '["a", 1]\n')],
                            "data file", "needs 'text' and 'label'"),
    "data_empty": (lambda t: ["data.type", "csv:" + _data_file(t, "d.csv", "")], "data file",
                   "needs 'text' and 'label'"),
    "data_no_label_column": (lambda t: ["data.type", "csv:" + _data_file(t, "d.csv", "text,y\na,1\n")], "data file",
                             "needs 'text' and 'label'"),
    "data_directory": (lambda t: ["data.type", f"csv:{t}"], "'data.type'", "an existing CSV file"),
    "data_empty_label": (lambda t: ["data.type", "csv:" + _data_file(t, "d.csv", "text,label\na,x\nb,\nc,y\n")],
                         "row 1", "empty or missing 'label'"),
    "data_blank_label": (lambda t: ["data.type", "csv:" + _data_file(t, "d.csv", "text,label\na,x\nb,  \nc,y\n")],
                         "row 1", "empty or missing 'label'"),
    "data_short_row": (lambda t: ["data.type", "csv:" + _data_file(t, "d.csv", "text,label\na,x\nb\nc,y\n")],
                       "row 1", "empty or missing 'label'"),
    "data_null_label": (lambda t: ["data.type", "jsonl:" + _data_file(
        t, "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n')], "row 1",
        "empty or missing 'label'"),
    "data_null_text": (lambda t: ["data.type", "jsonl:" + _data_file(
        t, "d.jsonl", '{"text": null, "label": "x"}\n{"text": "b", "label": "y"}\n')], "row 0",
        "empty or missing 'text'"),
    # data sanity
    "data_one_class": (lambda t: ["data.type", "csv:" + _data_file(t, "d.csv", "text,label\n" + "a b,x\n" * 30)],
                       "has 1 class ('x')", "needs at least two"),
    "num_labels_below_data": (lambda t: ["data.synthetic_num_classes", "3", "model.num_labels", "2"],
                              "'model.num_labels'", "at least the 3 classes"),
    "num_labels_one": (lambda t: ["model.num_labels", "1"], "'model.num_labels'", "at least the 2 classes"),
    "empty_test_split": (lambda t: ["data.splits", "[0.9, 0.1, 0.0]"], "'eval.split'", "'test' no examples"),
    "empty_val_split": (lambda t: ["data.splits", "[0.9, 0.0, 0.1]", "eval.split", "[val]"], "'eval.split'",
                        "'val' no examples"),
    "empty_both_splits": (lambda t: ["data.splits", "[1.0, 0.0, 0.0]", "eval.split", "[val, test]"],
                          "'eval.split'", "'val' and 'test' no examples"),
}


@pytest.mark.parametrize("name", list(PATH_ROWS))
def test_unusable_paths_and_data_exit_2_before_training(name, tmp_path, capsys):
    """outdir/expname, model directories, data files and data that cannot be trained: one line, exit 2."""
    setup, key, fragment = PATH_ROWS[name]
    overrides = setup(tmp_path)
    if "outdir" not in overrides:
        overrides = ["outdir", str(tmp_path / "out"), *overrides]
    code, lines = run_cli(["run", "--cfg", "/dev/null", "--quiet", *BASE, *overrides], capsys)
    assert_one_line(code, lines, key, fragment)
    assert not list(tmp_path.rglob("summary.json"))
    assert not list(tmp_path.rglob("eval_results.log"))  # refused before training started


def test_absolute_expname_writes_nothing_outside_outdir(tmp_path, capsys):
    """The issue's case: ``expname /abs/path`` is refused and that path is not created."""
    target = tmp_path / "outside"
    code, lines = run_cli(["run", "--cfg", "/dev/null", "--quiet", *BASE, "outdir", str(tmp_path / "out"),
                           "expname", str(target)], capsys)
    assert_one_line(code, lines, "'expname'")
    assert not target.exists()


CHECKPOINT_ROWS = {
    "latest_non_utf8": (b"\xff\xfe", "corrupt checkpoint pointer"),
    "latest_escapes": (b"../../../../etc", "is not a round directory name"),
    "latest_missing_dir": (b"round_000001", "corrupt checkpoint"),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_ROWS))
def test_damaged_checkpoint_pointer_is_refused_with_one_line(name, tmp_path, capsys):
    """``--resume`` with a LATEST pointer that is not UTF-8, points outside, or names nothing: one line, exit 2."""
    data, fragment = CHECKPOINT_ROWS[name]
    _write(tmp_path / "fedit" / "checkpoint" / "LATEST", data)
    code, lines = run_cli(["run", "--cfg", "/dev/null", *BASE, "outdir", str(tmp_path), "--resume", "--quiet"],
                          capsys)
    assert_one_line(code, lines, fragment)


# -- real processes: no traceback, bounded time ------------------------------------------------------------------
SUBPROCESS_ROWS = {
    "readme_resume_command": (["federate.save_freq", "5", "--resume"], "no checkpoint to resume from"),
    "alias_bomb": (["@bomb"], "aliases expand to more than"),
    "deep_list": (["@deep"], "nesting deeper than 64 levels"),
    "tok_len_1e9": (["llm.tok_len", "1000000000"], "lower llm.tok_len"),
    "lda_100000_clients": (["federate.client_num", "100000", "data.splitter", "lda"], "at most 32 clients"),
}


#: rows run in the default suite; the others are marked slow (each process imports torch and transformers).
DEFAULT_SUBPROCESS_ROWS = ("readme_resume_command", "alias_bomb")


@pytest.mark.parametrize("name", [n if n in DEFAULT_SUBPROCESS_ROWS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in SUBPROCESS_ROWS])
def test_bad_input_as_a_real_process_has_no_traceback(name, tmp_path):
    """As a process: exit status 2, one stderr line, no traceback, within 60 s."""
    extra, fragment = SUBPROCESS_ROWS[name]
    cfg = "/dev/null"
    if extra == ["@bomb"]:
        cfg, extra = str(_write(tmp_path / "c.yaml", BILLION_LAUGHS)), []
    elif extra == ["@deep"]:
        cfg, extra = str(_write(tmp_path / "c.yaml", "seed: " + "[" * 5000 + "]" * 5000)), []
    env = {**os.environ, "FS_GMFL_THREADS": "1"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "fs_gmfl", "run", "--cfg", cfg, *BASE, "outdir", str(tmp_path),
                             *extra], capture_output=True, text=True, timeout=120, env=env)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("fs-gmfl: error:"), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 60
