"""``fs-gmfl bench``: every benchmark's bad option is one line naming the option and the value, exit 2 (issue #28).

Explicit values are validated before ``--quick`` applies its own, and ``--quick``
never replaces an explicit value; an unknown benchmark names the allowed
ones; ``bench --help`` lists them; a benchmark whose ``--out`` holds a finished
run of another configuration refuses (naming it and ``--fresh``) instead of
reading it as its own or replacing it.
"""

from __future__ import annotations

import json

import pytest

from fs_gmfl.bench import BENCHMARKS
from fs_gmfl.bench.common import earlier_summary
from fs_gmfl.cli import main
from fs_gmfl.config import load_config
from fs_gmfl.config.loader import config_to_yaml
from fs_gmfl.errors import InputError

#: (benchmark, its arguments, the option named, the value as the message quotes it)
BAD_OPTIONS = [
    ("gmfl", ["--rounds", "-1"], "--rounds", "-1"),
    ("gmfl", ["--quick", "--rounds", "-1"], "--rounds", "-1"),
    ("gmfl", ["--seeds", "abc"], "--seeds", "'abc'"),
    ("gmfl", ["--quick", "--seeds", "abc"], "--seeds", "'abc'"),
    ("gmfl", ["--lr", "nan"], "--lr", "'nan'"),
    ("gmfl", ["--subsample", "2"], "--subsample", "'2'"),
    ("gmfl", ["--methods", "FedIT,Nope"], "--methods", "unknown method 'Nope'"),
    ("gmfl", ["--out", "/dev/null"], "--out", "'/dev/null'"),
    ("hafl", ["--rounds", "3"], "--rounds", "3 is odd"),
    ("hafl", ["--quick", "--rounds", "0"], "--rounds", "0"),
    ("hafl", ["--seeds", "1,x"], "--seeds", "'x'"),
    ("hafl", ["--methods", "LoRA"], "--methods", "unknown method 'LoRA'"),
    ("hafl", ["--profile-cost", "--cost-ranks", "1,17"], "--cost-ranks", "17 is outside 1..16"),
    ("hafl", ["--cost-ranks", "0"], "--cost-ranks", "0 is outside 1..16"),
    ("hafl", ["--cost-ranks", ","], "--cost-ranks", "needs at least one rank"),
    ("hafl", ["--profile-cost", "--cost-warmup", "-1"], "--cost-warmup", "-1"),
    ("fedhft", ["--quick", "--seeds", "abc"], "--seeds", "'abc'"),
    ("fedhft", ["--methods", "fedhft_k0"], "--methods", "'fedhft_k0'"),
    ("fedhft", ["--rounds", "99999999999999999999"], "--rounds", "99999999999999999999"),
    ("fedhft", ["--datasets", "nope"], "--datasets", "'nope'"),
    ("fedkrso", ["--quick", "--rounds", "-1"], "--rounds", "-1"),
    ("fedkrso", ["--lr", "fedit=-1"], "--lr", "'-1'"),
    ("fedkrso", ["--splits", "xyz"], "--splits", "unknown split 'xyz'"),
    ("fedkrso", ["--targets", "que ry"], "--targets", "'que ry' is not a module name"),
    ("fedkrso", ["--targets", ","], "--targets", "',' names no module"),
    ("fedkrso", ["--basis", "nope"], "--basis", "'nope'"),
    ("fseval", ["--threads", "99999"], "--threads", "99999"),
    ("fseval", ["--methods", "nope"], "--methods", "'nope'"),
    ("fshost", ["--rounds", "abc"], "--rounds", "'abc'"),
    ("fshost", ["--repeats", "0"], "--repeats", "0"),
    ("llm", ["--quick", "--rounds", "-1"], "--rounds", "-1"),
    ("llm", ["--quick", "--seeds", "abc"], "--seeds", "'abc'"),
    ("llm", ["--methods", "Nope"], "--methods", "'Nope'"),
    ("perf", ["--blocks", "nope"], "--blocks", "unknown block 'nope'"),
    ("perf", ["--quick", "--repeats", "-3"], "--repeats", "-3"),
    ("aggregate", ["--quick", "--clients", "-1"], "--clients", "-1"),
]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    """``main(argv)`` in-process (argparse's SystemExit included): exit code, stdout and the stderr lines."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


@pytest.mark.parametrize("name, args, option, value", BAD_OPTIONS,
                         ids=[f"{n}{' quick' if '--quick' in a else ''} {o} {a[-1]}" for n, a, o, _ in BAD_OPTIONS])
def test_a_bad_option_value_is_one_line_naming_the_option_and_the_value(name, args, option, value, capsys):
    code, _, lines = run_cli(["bench", name, *args], capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"fs-gmfl bench {name}: error: option {option}: "), lines[0]
    assert value in lines[0] and "Traceback" not in lines[0]


def test_an_unknown_option_is_one_line(capsys):
    code, _, lines = run_cli(["bench", "gmfl", "--round", "3", "--bogus"], capsys)
    assert code == 2 and len(lines) == 1 and "--bogus" in lines[0], lines


def test_quick_keeps_explicit_values_and_fills_in_the_rest():
    from fs_gmfl.bench import gmfl, llm

    args = gmfl.parse_args(["--quick", "--rounds", "3"])
    assert (args.rounds, args.period, args.seeds) == (3, 2, [0])  # explicit rounds, quick period and seeds
    assert llm.parse_args(["--quick", "--seeds", "4,5"]).seeds == [4, 5]
    assert llm.parse_args(["--quick"]).seeds == [0] and llm.parse_args([]).seeds == [0, 1, 2]


def test_an_unknown_benchmark_names_the_allowed_ones(capsys):
    code, _, lines = run_cli(["bench", "nope"], capsys)
    assert code == 2 and lines == [f"fs-gmfl: error: unknown benchmark 'nope' (allowed: {', '.join(BENCHMARKS)})"]


def test_bench_help_lists_every_benchmark_with_its_description(capsys):
    code, out, _ = run_cli(["bench", "--help"], capsys)
    assert code == 0
    for name, description in BENCHMARKS.items():
        assert any(line.split() == [name, *description.split()] for line in out.splitlines()), name


def foreign_run(run_dir, **summary):
    """A finished run of the default configuration (not the benchmark's) in ``run_dir``."""
    run_dir.mkdir(parents=True)
    cfg = load_config(None, ["outdir", str(run_dir.parent), "expname", run_dir.name])
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return {p.name: p.read_bytes() for p in run_dir.iterdir()}


@pytest.mark.parametrize("with_config", [True, False])
def test_llm_refuses_an_out_holding_another_benchmarks_run(tmp_path, capsys, with_config):
    """``bench gmfl`` also writes ``runs/fedit_s0``: ``bench llm`` once read it as its own (StopIteration)."""
    run_dir = tmp_path / "runs" / "fedit_s0"
    before = foreign_run(run_dir, per_round=[{"round": 0, "test_acc": 0.5}], rounds=0)
    if not with_config:
        (run_dir / "config.yaml").unlink()
        del before["config.yaml"]
    code, _, lines = run_cli(["bench", "llm", "--quick", "--no-timing", "--methods", "FedIT", "--out",
                              str(tmp_path)], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert str(run_dir) in lines[0] and "--fresh" in lines[0]
    assert ("there," in lines[0]) if with_config else ("config.yaml is missing" in lines[0])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # the earlier results are intact


def test_a_finished_run_of_the_same_configuration_is_reused(tmp_path):
    words = ["outdir", str(tmp_path), "expname", "run", "seed", "3"]
    foreign_run(tmp_path / "run", marker=1)
    (tmp_path / "run" / "config.yaml").write_text(config_to_yaml(load_config(None, words)), encoding="utf-8")
    assert earlier_summary(load_config(None, words), fresh=False) == {"marker": 1}
    assert earlier_summary(load_config(None, words), fresh=True) is None
    with pytest.raises(InputError, match="seed is 3 there, 4 here"):
        earlier_summary(load_config(None, [*words, "seed", "4"]), fresh=False)
    # another host's section (the simulator never reads flower.*) leaves the run valid
    assert earlier_summary(load_config(None, [*words, "flower.node_wait_s", "5"]), fresh=False) == {"marker": 1}
