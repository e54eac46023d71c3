"""``fs-gmfl bench fseval``: a model fine-tuned under FederatedScope, scored by FederatedScope-LLM's own scripts.

Takes FederatedScope-LLM's GSM8K baseline configuration
(``federatedscope/llm/baseline/exp_yaml/gsm/gsm_federate.yaml``, read from the
installed FederatedScope tree), points it at local data and the local model,
switches an fs_gmfl method on with that method's own keys (``gmfl.use True``;
``federate.method hafl`` + ``hafl.*``), trains it with ``fs-gmfl fs-run``, and
scores the base model and every fine-tuned checkpoint with FederatedScope-LLM's
evaluation scripts through ``fs-gmfl fs-eval``: ``gsm8k`` (exact match of the
sampled 8-shot answer), ``gsm8k_training_prompt`` (the same questions and scorer,
each asked zero-shot in the template the models were tuned with), ``mmlu`` (5-shot multiple choice) and ``humaneval``
(generation only: pass@k executes the generated code, which needs a sandbox;
reported instead: the share of completions that parse as Python). The test
files are built offline by :mod:`fs_gmfl.hosts.fs.eval_data`.

Writes ``results.json`` and ``table.md`` to ``--out``; every subprocess's
output is kept in ``<out>/logs``. Must run in an interpreter where
FederatedScope is importable.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fs_gmfl.bench.common import machine, markdown_table, progress, write_json
from fs_gmfl.bench.options import BenchParser, integer, non_negative_real, output_dir, positive, subset
from fs_gmfl.config.environment import THREADS
from fs_gmfl.errors import InputError
from fs_gmfl.hosts.fs.eval_data import write_eval_data
from fs_gmfl.plots import MIB

#: method name -> its switch on the baseline (the method's own keys only)
SWITCHES = {
    "gmfl": ["gmfl.use", "True", "gmfl.period", "2"],
    "hafl": ["federate.method", "hafl", "hafl.scheme", "truncation",
             "hafl.profiles", "[{'share': 0.34, 'rank': 2}, {'share': 0.33, 'rank': 4}, {'share': 0.33, 'rank': 8}]"],
}
#: bench script name -> the fs-eval script and its extra options (``gsm8k_training_prompt``: the same questions and
#: scorer, asked in the training template; see :mod:`fs_gmfl.hosts.fs.evaluate`)
SCRIPT_RUNS = {"gsm8k": ("gsm8k", []), "gsm8k_training_prompt": ("gsm8k", ["--prompt", "training"]),
               "mmlu": ("mmlu", []), "humaneval": ("humaneval", [])}
SCRIPTS = tuple(SCRIPT_RUNS)
GSM8K_RATE = re.compile(r"Num of total question: (\d+), correct num: (\d+), correct rate: ([0-9]+(?:\.[0-9]+)?)")
MMLU_SUBJECT = re.compile(r"Average accuracy ([0-9.]+) - (\w+)")
MMLU_TOTAL = re.compile(r"Average accuracy: ([0-9.]+)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Benchmark options."""
    p = BenchParser("fseval", __doc__)
    p.add_argument("--out", type=output_dir, default="bench_out/fseval")
    p.add_argument("--model", default="", help="a local Hugging Face model directory (default: the exported "
                   "SmolLM2-135M-Instruct; `bash scripts/install.sh --llm`)")
    p.add_argument("--methods", type=subset(list(SWITCHES)), default=",".join(SWITCHES),
                   help="comma-separated subset of: " + ", ".join(SWITCHES))
    p.add_argument("--rounds", type=positive, default=10)
    p.add_argument("--steps", type=positive, default=10, help="train.local_update_steps (batch 1, as the baseline)")
    p.add_argument("--lr", type=non_negative_real, default=0.0,
                   help="train.optimizer.lr (default 0: the baseline's)")
    p.add_argument("--gsm8k-questions", type=positive, default=40)
    p.add_argument("--mmlu-questions", type=positive, default=40, help="test questions per MMLU subject (2 subjects)")
    p.add_argument("--humaneval-problems", type=positive, default=10)
    p.add_argument("--scripts", type=subset(SCRIPTS, what="script"), default=",".join(SCRIPTS),
                   help="comma-separated subset of: " + ", ".join(SCRIPTS))
    p.add_argument("--threads", type=thread_count, default=0, help="torch threads of the evaluation scripts "
                   "(FS_GMFL_THREADS; default 0: the usable CPUs). One is much faster on a machine shared with other "
                   "jobs; FederatedScope's standalone training always uses one")
    p.add_argument("--reuse-training", action="store_true", help="keep the trained checkpoints of an earlier "
                   "invocation with the same --out (its results.json) and only evaluate")
    p.add_argument("--sim-eval-only", action="store_true", help="only add the simulator's own evaluation (exact "
                   "match and token loss on the evals_math test split, Alpaca prompt, greedy) of the base model and "
                   "every checkpoint in --out's results.json")
    p.add_argument("--half", action="store_true", help="keep the baseline's train.is_enable_half True "
                   "(default: fp32, since float16 matmuls are slow on CPUs)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="extra override for training and evaluation (repeatable)")
    return p.parse_args(list(argv))


def thread_count(text: str) -> int:
    """0 (the usable CPUs) or a thread count ``FS_GMFL_THREADS`` accepts."""
    return integer(text, 0, THREADS.high)


def baseline_yaml() -> Path:
    """FederatedScope-LLM's GSM8K baseline configuration in the installed FederatedScope tree."""
    from fs_gmfl.hosts.fs.evaluate import baseline_config

    return baseline_config("gsm", "gsm_federate.yaml")


def model_dir(arg: str) -> Path:
    """The model directory: ``--model`` or the exported SmolLM2 (built from the installed package once)."""
    if arg:
        return Path(arg).resolve()
    from fs_gmfl.hosts.common import smollm2

    return Path(smollm2.smollm2_dir())


def common_overrides(args: argparse.Namespace, data: Path, model: Path) -> list[str]:
    """Edits to the baseline shared by training and evaluation: local paths, CPU, the compute budget."""
    # data.splits: the baseline's [0.998, 0.001, 0.001] leaves 1 of ~1,100 rows for validation, so some clients
    # have no val_loss, FederatedScope's eval.best_res_update_round_wise_key (ValueError in its monitor)
    opts = ["data.root", str(data), "data.type", "instructions.json@llm", "model.type", f"{model}@huggingface_llm",
            "data.splits", "[0.98, 0.01, 0.01]", "use_gpu", "False", "federate.total_round_num", str(args.rounds),
            "train.local_update_steps", str(args.steps), "eval.freq", str(args.rounds)]
    if not args.half:
        opts += ["train.is_enable_half", "False"]
    if args.lr:
        opts += ["train.optimizer.lr", str(args.lr)]
    return opts + [x for pair in args.set for x in pair]


def fs_env(threads: int = 0) -> dict[str, str]:
    """Offline subprocess environment with this checkout importable (and ``FS_GMFL_THREADS`` when ``threads``)."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    if env.get("FS_GMFL_DATA"):  # the children run in --out: a relative data directory must still point here
        env["FS_GMFL_DATA"] = os.path.abspath(env["FS_GMFL_DATA"])
    if threads:
        env["FS_GMFL_THREADS"] = str(threads)
    return env


def run_logged(cmd: list[str], log: Path, cwd: Path, threads: int = 0) -> tuple[int, str, float]:
    """Run ``cmd`` with its output streamed into ``log`` (follow it with ``tail -f``); (exit status, output, s)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as handle:
        status = subprocess.run(cmd, cwd=cwd, env=fs_env(threads), stdout=handle, stderr=subprocess.STDOUT).returncode
    return status, log.read_text(encoding="utf-8", errors="replace"), time.perf_counter() - start


def train(args: argparse.Namespace, method: str, out: Path, common: list[str]) -> dict[str, Any]:
    """``fs-gmfl fs-run`` of the baseline with ``method``'s switch; the final checkpoint and the run's summary."""
    run_dir = out / method
    cmd = [sys.executable, "-m", "fs_gmfl", "fs-run", "--cfg", str(baseline_yaml()), *common, *SWITCHES[method],
           "outdir", str(run_dir), "expname", method, "federate.save_to", str(run_dir / f"{method}.ckpt")]
    status, output, seconds = run_logged(cmd, out / "logs" / f"train_{method}.log", out)
    if status != 0:
        raise InputError(f"training {method} exited {status}; see {out / 'logs' / f'train_{method}.log'}:\n"
                         + output[-1500:])
    summary = json.loads(next(run_dir.rglob("summary.json")).read_text(encoding="utf-8"))
    return {"seconds": seconds, "checkpoint": str(run_dir / f"final_{method}.ckpt"), "method": summary["method"],
            "uplink_mib": summary["comm"]["uplink_bytes"] / MIB, "downlink_mib": summary["comm"]["downlink_bytes"] / MIB,
            "accepted_updates": summary.get("accepted_updates"), "rejected": summary.get("rejected_updates"),
            "frozen_fraction": [r.get("frozen_fraction") for r in summary["per_round"]]}


def parse_gsm8k(output: str) -> dict[str, Any]:
    """The last running tally printed by FederatedScope's GSM8K script."""
    found = GSM8K_RATE.findall(output)
    if not found:
        raise InputError("the GSM8K script printed no 'correct rate' line")
    total, correct, rate = found[-1]
    return {"questions": int(total), "correct": int(correct), "accuracy": float(rate)}


def parse_mmlu(output: str) -> dict[str, Any]:
    """Per-subject and overall accuracy printed by FederatedScope's MMLU script."""
    total = MMLU_TOTAL.findall(output)
    if not total:
        raise InputError("the MMLU script printed no overall 'Average accuracy' line")
    subjects = {name: float(acc) for acc, name in MMLU_SUBJECT.findall(output) if "_" in name}
    return {"accuracy": float(total[-1]), "subjects": subjects}


def completion_parses(prompt: str, completion: str) -> bool:
    """Whether the prompt plus the completion is syntactically valid Python (nothing is executed)."""
    try:
        ast.parse(prompt + completion)
    except (SyntaxError, ValueError):
        return False
    return True


def parse_humaneval(answers: Path, problems: Path) -> dict[str, Any]:
    """Generated completions (FederatedScope writes 5 per problem) and the share that parse as Python."""
    import gzip

    prompts = {}
    for line in gzip.decompress(problems.read_bytes()).decode("utf-8").splitlines():
        if line.strip():
            task = json.loads(line)
            prompts[task["task_id"]] = task["prompt"]
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines() if line.strip()]
    parses = sum(completion_parses(prompts[r["task_id"]], r["completion"]) for r in rows)
    return {"completions": len(rows), "problems": len({r["task_id"] for r in rows}),
            "parse_rate": parses / len(rows) if rows else 0.0, "pass_at_k": "not run (no sandbox)"}


def evaluate(args: argparse.Namespace, name: str, checkpoint: Path, out: Path, common: list[str],
             switch: list[str]) -> dict[str, Any]:
    """Every selected script on one checkpoint (``name`` 'base': a path that does not exist = the raw model)."""
    results: dict[str, Any] = {}
    checkpoint.parent.mkdir(parents=True, exist_ok=True)  # the HumanEval script writes its answers beside it
    for script in args.scripts:
        fs_script, options = SCRIPT_RUNS[script]
        cmd = [sys.executable, "-m", "fs_gmfl", "fs-eval", fs_script, "--cfg", str(baseline_yaml()), *common, *switch,
               "outdir", str(out / "eval" / name), "expname", f"{script}_{name}", "federate.save_to", str(checkpoint),
               *options]
        progress(f"fseval: {script} on {name}")
        status, output, seconds = run_logged(cmd, out / "logs" / f"eval_{script}_{name}.log", out, args.threads)
        if status != 0:
            raise InputError(f"fs-eval {script} on {name} exited {status}: {output[-1500:]}")
        loaded = "will use raw model" not in output
        if loaded != (name != "base"):
            raise InputError(f"fs-eval {script} on {name}: checkpoint {'not ' if not loaded else ''}loaded")
        if fs_script == "gsm8k":
            results[script] = parse_gsm8k(output)
        elif script == "mmlu":
            results[script] = parse_mmlu(output)
        else:
            results[script] = parse_humaneval(Path(f"{checkpoint}_humaneval_answer.jsonl"),
                                              out / "data" / "HumanEval.jsonl.gz")
        results[script]["seconds"] = seconds
    return results


def table(results: dict[str, Any]) -> str:
    """Base vs fine-tuned, one row per model."""
    header = ["model", "GSM8K-format EM (FS script)", "the same, training prompt (FS scorer)",
              "MMLU-format acc: math / clinical / all", "HumanEval: "
              "completions parsing as Python", "simulator: EM / token loss (evals_math test)", "uplink MiB",
              "training s"]
    rows = []
    for name, res in results["models"].items():
        gsm, mmlu, code = res.get("gsm8k", {}), res.get("mmlu", {}), res.get("humaneval", {})
        asked = res.get("gsm8k_training_prompt", {})
        own = res.get("simulator", {})
        trained = results["training"].get(name, {})
        subjects = mmlu.get("subjects", {})
        rows.append([
            name if name == "base" else trained.get("method", name),
            f"{gsm['correct']}/{gsm['questions']} = {gsm['accuracy']:.3f}" if gsm else "-",
            f"{asked['correct']}/{asked['questions']} = {asked['accuracy']:.3f}" if asked else "-",
            " / ".join(f"{subjects.get(s, float('nan')):.3f}" for s in ("high_school_mathematics",
                                                                         "clinical_knowledge"))
            + f" / {mmlu['accuracy']:.3f}" if mmlu else "-",
            f"{code['parse_rate']:.2f} of {code['completions']}" if code else "-",
            (f"{own['test_exact_match']:.2f} / {own['test_token_loss']:.3f}" if own else "-"),
            f"{trained['uplink_mib']:.2f}" if trained else "-",
            f"{trained['seconds']:.0f}" if trained else "-"])
    return markdown_table(header, rows)


#: the simulator's LLM configuration whose data, split, adapter shape and evaluation the checkpoints are scored with
SIM_CFG = Path(__file__).resolve().parents[2] / "yaml_configs" / "llm" / "smollm2_fedit.yaml"


def simulator_scores(out: Path, checkpoints: dict[str, str | None]) -> dict[str, dict[str, float]]:
    """The simulator's evaluation (``yaml_configs/llm/smollm2_fedit.yaml``: evals_math test split, exact match on
    100 rows, token loss) of the base model and each FederatedScope checkpoint, loaded into the same LoRA model."""
    import torch

    from fs_gmfl.config import load_config
    from fs_gmfl.core.adapter import adapter_key
    from fs_gmfl.hosts.sim.runner import Simulation, temporarily_loaded

    cfg = load_config(str(SIM_CFG), ["outdir", str(out / "sim_eval"), "expname", "scores"])
    sim = Simulation(cfg, quiet=True, overwrite=True)
    sim.setup()
    own_keys = set(sim.method.strategy.global_adapter())
    scores = {}
    for name, checkpoint in checkpoints.items():
        progress(f"fseval: simulator evaluation of {name}")
        tensors: dict[str, torch.Tensor] = {}
        if checkpoint:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
            tensors = {matching_key(adapter_key(k), own_keys): v.float() for k, v in state.items()}
        with temporarily_loaded(sim.model, tensors):
            scores[name] = sim._evaluate_splits("")
    return scores


def matching_key(key: str, own_keys: set[str]) -> str:
    """The simulator's adapter key that FederatedScope's ``key`` ends with (peft prefixes differ by host)."""
    found = [k for k in own_keys if key.endswith(k) or k.endswith(key)]
    if len(found) != 1:
        raise InputError(f"checkpoint key {key!r} matches {len(found)} adapter keys of the simulator's model")
    return found[0]


def earlier_training(out: Path) -> dict[str, Any]:
    """The training records of an earlier invocation's ``results.json`` in ``out`` (empty when none)."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8")).get("training", {})


def add_simulator_scores(out: Path) -> int:
    """``--sim-eval-only``: the simulator's scores of base + each trained checkpoint, into results.json/table.md."""
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    checkpoints = {"base": None, **{m: t["checkpoint"] for m, t in results["training"].items()}}
    for name, metrics in simulator_scores(out, checkpoints).items():
        results["models"].setdefault(name, {})["simulator"] = metrics
    write_json(out / "results.json", results)
    (out / "table.md").write_text(table(results) + "\n", encoding="utf-8")
    print(table(results))
    return 0


def main(argv: Sequence[str]) -> int:
    """Build the data, train each method, score base + each, write the table."""
    args = parse_args(argv)
    if args.sim_eval_only:
        return add_simulator_scores(Path(args.out).resolve())
    methods = args.methods
    out = Path(args.out).resolve()
    data = out / "data"
    written = write_eval_data(data, gsm8k_questions=args.gsm8k_questions, mmlu_questions=args.mmlu_questions,
                              humaneval_problems=args.humaneval_problems)
    model = model_dir(args.model)
    common = common_overrides(args, data, model)
    results: dict[str, Any] = {"machine": machine(), "baseline": str(baseline_yaml()), "model": str(model),
                               "data": written, "args": vars(args), "overrides": common,
                               "switches": {m: SWITCHES[m] for m in methods}, "training": {}, "models": {}}
    earlier = earlier_training(out) if args.reuse_training else {}
    for method in methods:
        if method in earlier and Path(earlier[method]["checkpoint"]).is_file():
            progress(f"fseval: reusing the trained {method} checkpoint {earlier[method]['checkpoint']}")
            results["training"][method] = earlier[method]
            continue
        progress(f"fseval: training {method} ({args.rounds} rounds x {args.steps} steps)")
        results["training"][method] = train(args, method, out, common)
        write_json(out / "results.json", results)
    results["models"]["base"] = evaluate(args, "base", out / "base" / "no_checkpoint.ckpt", out, common, [])
    write_json(out / "results.json", results)
    for method in methods:
        ckpt = Path(results["training"][method]["checkpoint"])
        results["models"][method] = evaluate(args, method, ckpt, out, common, SWITCHES[method])
        write_json(out / "results.json", results)
    (out / "table.md").write_text(table(results) + "\n", encoding="utf-8")
    print(table(results))
    return 0
