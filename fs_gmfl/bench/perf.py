"""``fs-gmfl bench perf``: where the simulator's time goes, against the limits it can reach, in one invocation.

Blocks, each interleaved (variant after variant, ``--repeats`` times) and
reported as medians with ratios:

* **train**: the simulator's training time for a run (``train_seconds`` of its
  rounds) against a plain transformers + peft loop doing the same number of
  AdamW steps on the same model and batch shapes (the limit), in fp32 and
  with bf16 autocast (``train.autocast``);
* **eval**: one evaluation of the same rows as the code evaluated before this
  benchmark existed (batches in row order under ``no_grad``, fp32), as it is
  now (length-sorted batches under ``inference_mode``), and now with bf16
  autocast, with the metrics each gives;
* **threads**: a child process pinned to one CPU training the same steps with
  torch's own default thread count against the count the simulator now
  chooses from the affinity mask (one);
* **llm** (not run by default): an LLM's tokens/s in the simulator against a
  plain loop on the same batches, and each method's client memory
  (:mod:`fs_gmfl.bench.perf_llm`);
* **hosts**: one YAML that loads in every host (``--hosts-cfg``), seconds per
  round of the rounds themselves (training plus evaluation of rounds 1..R;
  process start, imports, model loading and Flower's Ray start-up excluded) and
  final test accuracy, at equal settings (fp32; the simulator sequential with
  one and with two torch threads, Flower's simulation engine with the round's
  clients trained in parallel, one thread each and folded in client-id order,
  so its model is bit-identical to the one-thread simulator's) and
  FederatedScope standalone (which forces one thread; run with
  ``--fs-python``, the interpreter of its own environment, when FederatedScope
  is not importable here: Flower and FederatedScope cannot share one).
  Each host is skipped, and says so, when it is not installed. Writes
``results.json`` and ``table.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fs_gmfl.bench.common import (interleaved, machine, markdown_table, median_of, plain_adamw_seconds, progress,
                                  simulator_training, write_json)
from fs_gmfl.bench.options import BenchParser, non_negative, output_dir, positive, subset
from fs_gmfl.bench.perf_llm import llm_block, llm_text
from fs_gmfl.config import load_config
from fs_gmfl.hosts.sim.runner import Simulation
from fs_gmfl.hosts.sim.training import autocast_context, evaluate

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CFG = ROOT / "yaml_configs" / "quickstart.yaml"
#: the measurement blocks, in the order they run by default.
BLOCKS = ("train", "eval", "threads", "hosts", "llm")
#: the blocks that run without --blocks (llm needs SmolLM2: bash scripts/install.sh --llm).
DEFAULT_BLOCKS = ("train", "eval", "threads", "hosts")
#: what ``--quick`` sets (options given explicitly keep their values).
QUICK = {"rounds": "1", "repeats": "1", "thread_steps": "2"}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Benchmark options."""
    p = BenchParser("perf", __doc__, quick=QUICK, quick_help="smoke version: 1 round, 1 repeat, 2 thread steps")
    p.add_argument("--cfg", default=str(DEFAULT_CFG), help="a sequence-classification or causal-LM configuration")
    p.add_argument("--rounds", type=positive, default=2, help="rounds of each simulator run in the train block")
    p.add_argument("--repeats", type=positive, default=3, help="interleaved repetitions of every variant")
    p.add_argument("--thread-steps", type=positive, default=12, help="training steps per threads-block measurement")
    p.add_argument("--blocks", type=subset(BLOCKS, what="block"), default=",".join(DEFAULT_BLOCKS),
                   help=f"comma-separated subset of: {', '.join(BLOCKS)} (default: {','.join(DEFAULT_BLOCKS)}; "
                   "hosts is skipped without FederatedScope; llm needs SmolLM2)")
    p.add_argument("--llm-cfg", default=str(ROOT / "yaml_configs" / "llm" / "smollm2_fedit.yaml"),
                   help="llm block: the causal-LM configuration")
    p.add_argument("--llm-rounds", type=positive, default=2, help="llm block: rounds of each throughput run")
    p.add_argument("--llm-steps", type=positive, default=4, help="llm block: timed local steps per method")
    p.add_argument("--llm-warmup", type=non_negative, default=2, help="llm block: untimed steps before them")
    p.add_argument("--llm-set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="llm block: configuration override for every run (repeatable)")
    p.add_argument("--hosts-cfg", default=str(ROOT / "yaml_configs" / "fs" / "gmfl_fedit_minilm_both_hosts.yaml"))
    p.add_argument("--hosts-rounds", type=positive, default=4)
    p.add_argument("--hosts-set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="configuration override for every host of the hosts block (repeatable), e.g. "
                   "--hosts-set data.splitter iid --hosts-set data.splitter_args '[]'")
    p.add_argument("--fs-python", default="", help="the Python of FederatedScope's environment for the hosts block "
                   "(default: this one when FederatedScope is importable here, else .fs/venv/bin/python if present)")
    p.add_argument("--out", type=output_dir, default="bench_out/perf")
    p.add_argument("--threads-child", default="", help=argparse.SUPPRESS)
    return p.parse_args(list(argv))


def config(args: argparse.Namespace, run_dir: Path, name: str, *extra: str) -> Any:
    """The benchmark's configuration: ``--cfg`` with ``--rounds`` rounds and no evaluation before the last."""
    return load_config(args.cfg, ["federate.total_round_num", str(args.rounds), "eval.freq", str(args.rounds + 1),
                                  "outdir", str(run_dir), "expname", name, *extra])


# -- train -------------------------------------------------------------------------------------------------------
def simulator_run(args: argparse.Namespace, out: Path, autocast: str) -> dict[str, Any]:
    """One simulator run; its training seconds (evaluation excluded) and local steps."""
    return simulator_training(config(args, out / "runs", f"sim_{autocast}", "train.autocast", autocast))


def plain_loop(args: argparse.Namespace, out: Path, autocast: str, steps: int) -> dict[str, Any]:
    """The same model and batch shape trained for ``steps`` AdamW steps by a bare transformers + peft loop."""
    cfg = config(args, out / "runs", f"plain_{autocast}", "train.autocast", autocast)
    sim = Simulation(cfg, quiet=True, overwrite=True)
    sim.setup()
    data, batch_size = sim.data.train, cfg.dataloader.batch_size
    batches = [data.batch(torch.arange(step * batch_size, step * batch_size + batch_size) % len(data))
               for step in range(steps)]
    return {"seconds": plain_adamw_seconds(sim.model, cfg, batches), "steps": steps}


def train_block(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Simulator vs plain loop, fp32 and bf16 autocast."""
    probe = simulator_run(args, out, "none")  # warm-up, and the step count the plain loop matches
    steps = probe["steps"]
    variants = {f"{kind} {precision}": (lambda k=kind, p=precision: simulator_run(args, out, p) if k == "simulator"
                                        else plain_loop(args, out, p, steps))
                for precision in ("none", "bfloat16") for kind in ("simulator", "plain loop")}
    runs = interleaved(variants, args.repeats)
    medians = {name: median_of(r, "seconds") for name, r in runs.items()}
    return {"steps": steps, "runs": runs, "median_s": medians,
            "simulator_vs_plain": {p: medians[f"simulator {p}"] / medians[f"plain loop {p}"]
                                   for p in ("none", "bfloat16")},
            "bf16_vs_fp32_simulator": medians["simulator bfloat16"] / medians["simulator none"]}


# -- eval --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_in_row_order(model: torch.nn.Module, data: Any, *, batch_size: int) -> dict[str, float]:
    """The evaluation as it was before this benchmark (sequence classification): batches in row order."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
        count += int(labels.numel())
    return {"acc": correct / count, "loss": total_loss / count}


def eval_block(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Before / now / now + bf16 on the test split of ``--cfg`` (sequence classification)."""
    cfg = config(args, out / "runs", "eval")
    sim = Simulation(cfg, quiet=True, overwrite=True)
    sim.setup()
    data, size = sim.data.test, cfg.eval.batch_size

    def timed(fn: Callable[[], dict[str, float]]) -> dict[str, Any]:
        start = time.perf_counter()
        metrics = fn()
        return {"seconds": time.perf_counter() - start, **metrics}

    def now(precision: str) -> dict[str, Any]:
        with autocast_context(load_config(args.cfg, ["train.autocast", precision]), "cpu"):
            return timed(lambda: evaluate(sim.model, data, batch_size=size, task=cfg.model.task))

    variants = {"before (row order, no_grad, fp32)": lambda: timed(lambda: evaluate_in_row_order(
        sim.model, data, batch_size=size)), "now (length-sorted, inference_mode, fp32)": lambda: now("none"),
        "now + bf16 autocast": lambda: now("bfloat16")}
    runs = interleaved(variants, args.repeats)
    medians = {name: median_of(r, "seconds") for name, r in runs.items()}
    before = medians["before (row order, no_grad, fp32)"]
    return {"rows": len(data), "batch_size": size, "runs": runs, "median_s": medians,
            "ratio_to_before": {name: m / before for name, m in medians.items()},
            "metrics": {name: {k: r[0][k] for k in ("acc", "loss")} for name, r in runs.items()}}


# -- threads -----------------------------------------------------------------------------------------------------
def threads_child(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """In a child pinned to one CPU: ``--thread-steps`` training steps with ``threads`` torch threads."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(threads)
    out = Path(args.out).resolve()
    result = plain_loop(args, out, "none", args.thread_steps)
    return {**result, "threads": torch.get_num_threads(), "affinity": len(os.sched_getaffinity(0))}


def run_threads_child(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fs_gmfl", "bench", "perf", "--cfg", args.cfg, "--out", args.out,
           "--thread-steps", str(args.thread_steps), "--threads-child", str(threads)]
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "FS_GMFL_THREADS": str(threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def threads_block(args: argparse.Namespace) -> dict[str, Any]:
    """One CPU: torch's default thread count vs the simulator's choice (the affinity mask: 1)."""
    default = os.cpu_count() or 1
    variants = {f"torch default ({default} threads)": lambda: run_threads_child(args, default),
                "affinity-chosen (1 thread)": lambda: run_threads_child(args, 1)}
    runs = interleaved(variants, args.repeats)
    medians = {name: median_of(r, "seconds") for name, r in runs.items()}
    return {"steps": args.thread_steps, "runs": runs, "median_s": medians,
            "default_vs_chosen": medians[f"torch default ({default} threads)"] / medians["affinity-chosen (1 thread)"]}


# -- hosts -------------------------------------------------------------------------------------------------------
def hosts_overrides(args: argparse.Namespace, out: Path, name: str, autocast: str = "none") -> list[str]:
    """``--hosts-rounds`` rounds, one evaluation at the end, ``--hosts-set``, then the variant's precision (fp32
    unless ``autocast``) and outputs under ``out/hosts/name``."""
    return ["federate.total_round_num", str(args.hosts_rounds), "eval.freq", str(args.hosts_rounds),
            *hosts_set(args), "train.autocast", autocast, "outdir", str(out / "hosts"), "expname", name]


def hosts_set(args: argparse.Namespace) -> list[str]:
    """``--hosts-set`` pairs as one override list."""
    return [x for pair in args.hosts_set for x in pair]


def rounds_of(summary: dict[str, Any], rounds: int, wall: float) -> dict[str, Any]:
    """Seconds per round (training + evaluation of rounds 1..R) and the final test accuracy of a summary."""
    rows = [r for r in summary["per_round"] if r["round"] > 0]
    fl = sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in rows)
    train = sum(r.get("train_seconds", 0.0) for r in rows)
    return {"seconds_per_round": fl / rounds, "train_seconds_per_round": train / rounds, "wall_s": wall,
            "test_acc": summary["final"].get("test_acc")}


def simulator_round_seconds(args: argparse.Namespace, out: Path, threads: int, autocast: str = "none") -> dict[str, Any]:
    """The simulator on ``--hosts-cfg`` in a child process with ``threads`` torch threads (fp32, or ``autocast``)."""
    name = f"sim_{threads}t" + ("" if autocast == "none" else f"_{autocast}")
    cmd = [sys.executable, "-m", "fs_gmfl", "run", "--cfg", args.hosts_cfg, "--quiet", "--overwrite",
           *hosts_overrides(args, out, name, autocast)]
    return {**host_child(cmd, out / "hosts" / name, args.hosts_rounds, {"FS_GMFL_THREADS": str(threads)}),
            "threads": threads}


def flower_round_seconds(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Flower's simulation engine on ``--hosts-cfg``: the round's clients in parallel, one thread each, fp32."""
    name = "flower_parallel"
    parallel = max(1, os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "fs_gmfl", "flower-run", "--cfg", args.hosts_cfg, "--quiet", "--overwrite",
           *hosts_overrides(args, out, name), "flower.max_parallel", str(parallel), "flower.client_threads", "1",
           "flower.fold_order", "client_id"]
    return {**host_child(cmd, out / "hosts" / name, args.hosts_rounds, {}), "threads": 1, "parallel": parallel}


def host_child(cmd: list[str], run_dir: Path, rounds: int, env: dict[str, str]) -> dict[str, Any]:
    """Run one host's command in a child process; its per-round figures from ``summary.json``."""
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} failed (exit {result.returncode}): {result.stderr[-1500:]}")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return rounds_of(summary, rounds, wall)


def federatedscope_round_seconds(args: argparse.Namespace, out: Path, python: str) -> dict[str, Any]:
    """FederatedScope standalone on ``--hosts-cfg`` (its runner forces one thread; fp32), with ``python``."""
    from fs_gmfl.bench.fshost import run_federatedscope

    fs_args = argparse.Namespace(cfg=args.hosts_cfg, rounds=args.hosts_rounds, set=list(args.hosts_set),
                                 python=python)
    result = run_federatedscope(fs_args, out / "hosts")
    return {"seconds_per_round": result["fl_s"] / args.hosts_rounds, "wall_s": result["wall_s"],
            "test_acc": result["test_acc"], "threads": 1}


def federatedscope_python(args: argparse.Namespace) -> str | None:
    """The interpreter that can import FederatedScope: ``--fs-python``, this one, or ``.fs/venv/bin/python``."""
    if args.fs_python:
        return args.fs_python
    from fs_gmfl.hosts.fs import fs_available

    if fs_available():
        return sys.executable
    candidate = ROOT / ".fs" / "venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else None


def flower_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flwr") is not None


def hosts_block(args: argparse.Namespace, out: Path) -> dict[str, Any] | None:
    """Simulator (1 and 2 threads), Flower (parallel clients) and FederatedScope, per round, side by side."""
    load_config(args.hosts_cfg, hosts_overrides(args, out, "check"))  # a bad file or --hosts-set: one line, no child
    variants: dict[str, Callable[[], dict[str, Any]]] = {
        "simulator, sequential (1 thread, fp32)": lambda: simulator_round_seconds(args, out, 1),
        "simulator, sequential (2 threads, fp32)": lambda: simulator_round_seconds(args, out, 2),
        "simulator at its best (2 threads, bf16 autocast)": lambda: simulator_round_seconds(args, out, 2, "bfloat16")}
    if flower_available():
        variants["Flower simulation, clients in parallel (1 thread each, fp32)"] = lambda: flower_round_seconds(args,
                                                                                                               out)
    else:
        progress("perf: hosts block without Flower (flwr is not installed: bash scripts/install.sh --flower)")
    python = federatedscope_python(args)
    if python:
        variants["FederatedScope standalone (1 thread, fp32)"] = lambda: federatedscope_round_seconds(args, out,
                                                                                                      python)
    else:
        progress("perf: hosts block without FederatedScope (not importable; --fs-python names its interpreter)")
    runs = interleaved(variants, args.repeats)
    medians = {name: median_of(r, "seconds_per_round") for name, r in runs.items()}
    sequential = medians["simulator, sequential (2 threads, fp32)"]
    return {"rounds": args.hosts_rounds, "runs": runs, "median_s_per_round": medians,
            "ratio_to_simulator_2_threads": {name: s / sequential for name, s in medians.items()}}


# -- report ------------------------------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    """One table per block."""
    parts = []
    if "train" in results:
        block = results["train"]
        rows = [[name, f"{s:.2f}", f"{s / block['steps'] * 1000:.0f}"] for name, s in block["median_s"].items()]
        parts.append(f"train ({block['steps']} steps; simulator / plain loop: fp32 "
                     f"{block['simulator_vs_plain']['none']:.3f}, bf16 {block['simulator_vs_plain']['bfloat16']:.3f};"
                     f" bf16 / fp32 simulator {block['bf16_vs_fp32_simulator']:.3f})\n\n"
                     + markdown_table(["variant", "median s", "ms / step"], rows))
    if "eval" in results:
        block = results["eval"]
        rows = [[name, f"{block['median_s'][name]:.2f}", f"{block['ratio_to_before'][name]:.3f}",
                 f"{m['acc']:.4f}", f"{m['loss']:.6f}"] for name, m in block["metrics"].items()]
        parts.append(f"eval ({block['rows']} rows, batch {block['batch_size']})\n\n"
                     + markdown_table(["variant", "median s", "vs before", "acc", "loss"], rows))
    if results.get("hosts"):
        block = results["hosts"]
        rows = [[name, f"{s:.2f}", f"{block['ratio_to_simulator_2_threads'][name]:.3f}",
                 f"{block['runs'][name][-1]['test_acc']}"] for name, s in block["median_s_per_round"].items()]
        parts.append(f"hosts ({block['rounds']} rounds; medians of {len(next(iter(block['runs'].values())))})\n\n"
                     + markdown_table(["variant", "median s / round", "vs simulator 2 threads", "final test acc"],
                                      rows))
    if "threads" in results:
        block = results["threads"]
        rows = [[name, f"{s:.2f}"] for name, s in block["median_s"].items()]
        parts.append(f"threads (one CPU, {block['steps']} steps; default / chosen {block['default_vs_chosen']:.2f})"
                     "\n\n" + markdown_table(["variant", "median s"], rows))
    if "llm" in results:
        parts.append(llm_text(results["llm"]))
    return "\n\n".join(parts)


def main(argv: Sequence[str]) -> int:
    """Run the selected blocks and write the results."""
    args = parse_args(argv)
    if args.threads_child:
        print(json.dumps(threads_child(args, int(args.threads_child))))
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "cfg": args.cfg, "args": vars(args)}
    blocks = {"train": lambda: train_block(args, out), "eval": lambda: eval_block(args, out),
              "threads": lambda: threads_block(args), "hosts": lambda: hosts_block(args, out),
              "llm": lambda: llm_block(args, out)}
    for name in args.blocks:
        results[name] = blocks[name]()
        write_json(out / "results.json", results)
    (out / "table.md").write_text(table(results) + "\n", encoding="utf-8")
    print(table(results))
    return 0
