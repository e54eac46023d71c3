"""``fs-gmfl bench fedkrso``: FedKRSO vs FedIT LoRA (same rank and targets) vs federated full fine-tuning.

Pre-trained MiniLM (BERT, 6 layers, hidden 384) with a 2-class head on Rotten
Tomatoes, 10 clients, iid and Dirichlet(0.5) partitions, several seeds. All
three methods train the same targeted linear layers (query, key, value,
attention output, intermediate, output of every block) plus the head:

* ``fedkrso``: in K random rank-r subspaces, uploading per-seed accumulators;
* ``fedit``: LoRA of the same rank on the same layers (alpha = 2r);
* ``fft``: the targeted weights themselves (AdamW), sent in full both ways.

Measured in one invocation, side by side:

* accuracy: final and best test accuracy, and test accuracy at the round of
  the best validation accuracy, per method, split and seed (runs interleaved
  method by method so that machine-load drift hits all methods alike);
* bytes: uplink and downlink per round, from the simulator's message ledger;
* client memory and step time: for each method a fresh child process builds
  the model and one client's plan (alternating the method order across
  repetitions), then (a) times local steps and records the peak RSS above the
  post-``prepare`` RSS (high-water mark reset through ``/proc/self/clear_refs``)
  and (b) profiles a few steps with ``torch.profiler(profile_memory=True)``,
  whose per-op allocation timeline gives the peak of live tensor bytes
  allocated during training (gradients, optimizer state, activations,
  subspace factors) on top of the model.

Outputs under ``--out``: ``results.json``, ``table.md``, ``accuracy.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fs_gmfl.bench.options import (BenchParser, assignments, module_names, output_dir, positive, positive_real,
                                  seed_list, subset)
from fs_gmfl.core.fedkrso.config import BASES

METHODS = ("fedkrso", "fedit", "fft")
SPLITS = ("iid", "lda")
#: what ``--quick`` sets (options given explicitly keep their values).
QUICK = {"rounds": "2", "seeds": "0", "splits": "iid", "steps": "6", "per_round": "3", "probe_steps": "4",
         "probe_reps": "1", "eval_freq": "1"}
#: the linear modules every method trains (``output.dense`` also matches ``attention.output.dense``).
TARGETS = ("query", "key", "value", "intermediate.dense", "output.dense")
DEFAULT_LR = {"fedkrso": 5e-4, "fedit": 2e-3, "fft": 2e-4}
MIB = 1024 * 1024


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    p = BenchParser("fedkrso", __doc__, quick=QUICK, quick_help="a smoke run: 2 rounds, seed 0, iid, 6 steps, "
                    "3 clients a round, 1 probe repetition of 4 steps")
    p.add_argument("--out", type=output_dir, default="bench_out/fedkrso", help="output directory")
    p.add_argument("--dataset", default="rotten_tomatoes", help="data.type (e.g. news_articles: 9 classes)")
    p.add_argument("--rounds", type=positive, default=6)
    p.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated run seeds")
    p.add_argument("--splits", type=subset(SPLITS, what="split"), default="iid,lda",
                   help="comma-separated: iid, lda (Dirichlet alpha 0.5)")
    p.add_argument("--methods", type=subset(METHODS), default=",".join(METHODS),
                   help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--clients", type=positive, default=10)
    p.add_argument("--per-round", type=positive, default=3, help="clients sampled per round")
    p.add_argument("--steps", type=positive, default=20, help="local steps per round (T)")
    p.add_argument("--interval", type=positive, default=5, help="FedKRSO interval J")
    p.add_argument("--num-seeds", type=positive, default=10, help="FedKRSO K")
    p.add_argument("--rank", type=positive, default=4, help="FedKRSO r and LoRA rank")
    p.add_argument("--targets", type=module_names, default=",".join(TARGETS),
                   help="comma-separated linear-module name suffixes every method trains (default: "
                        f"{','.join(TARGETS)}; a suffix matches at a dot, so output.dense also matches "
                        "attention.output.dense)")
    p.add_argument("--basis", choices=BASES, default="gaussian",
                   help="FedKRSO's projections, fedkrso.basis: gaussian (the paper), orthogonal, or identity (needs "
                        "--rank at least every targeted layer's d_in; a diagnostic)")
    p.add_argument("--batch", type=positive, default=8)
    p.add_argument("--tok-len", type=positive, default=48)
    p.add_argument("--eval-freq", type=positive, default=2)
    p.add_argument("--eval-split", default="[test]", help="server splits evaluated, e.g. '[val, test]' (val adds "
                   "the test accuracy at the round of best validation accuracy)")
    p.add_argument("--lr", action="append", type=assignments(METHODS, positive_real, form="METHOD=LR"), default=[],
                   help="METHOD=LR (default: fedkrso=5e-4, fedit=2e-3, fft=2e-4)")
    p.add_argument("--probe-steps", type=positive, default=10, help="timed steps per probe")
    p.add_argument("--probe-reps", type=positive, default=2, help="probe repetitions per method (alternating order)")
    p.add_argument("--no-accuracy", action="store_true", help="only the memory/step-time probes")
    p.add_argument("--no-probe", action="store_true", help="only the accuracy runs")
    p.add_argument("--probe-child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(list(argv))
    args.lrs = dict(DEFAULT_LR)
    for rates in args.lr:
        args.lrs.update(rates)
    return args


def run_overrides(args: argparse.Namespace, method: str, split: str, seed: int) -> list[str]:
    """``KEY VALUE`` overrides of one run."""
    targets = f"[{', '.join(args.targets)}]"
    out = ["model.type", "minilm", "data.type", args.dataset, "llm.tok_len", str(args.tok_len),
           "federate.method", method, "federate.client_num", str(args.clients),
           "federate.sample_client_num", str(args.per_round), "federate.total_round_num", str(args.rounds),
           "train.local_update_steps", str(args.steps), "dataloader.batch_size", str(args.batch),
           "train.optimizer.type", "AdamW", "train.optimizer.lr", str(args.lrs[method]),
           "train.optimizer.weight_decay", "0.01", "train.scheduler.type", "cosine_steps",
           "train.scheduler.warmup_ratio", "0.05", "train.scheduler.min_lr", "0",
           "llm.adapter.args", f"[{{r: {args.rank}, lora_alpha: {2 * args.rank}, target_modules: {targets}}}]",
           "fedkrso.target_modules", targets, "fft.target_modules", targets,
           "fedkrso.num_seeds", str(args.num_seeds), "fedkrso.rank", str(args.rank),
           "fedkrso.interval", str(args.interval), "fedkrso.basis", args.basis,
           "eval.freq", str(args.eval_freq), "eval.split", args.eval_split,
           "data.splitter", split, "seed", str(seed), "outdir", str(Path(args.out) / "runs"),
           "expname", f"{method}_{split}_s{seed}"]
    if split == "lda":
        out += ["data.splitter_args", "[{alpha: 0.5}]"]
    return out


# -- accuracy and bytes ------------------------------------------------------------------------------------------
def accuracy_run(args: argparse.Namespace, method: str, split: str, seed: int) -> dict[str, Any]:
    """One federated run; its accuracy curve, bytes per round and step times."""
    from fs_gmfl.config import load_config
    from fs_gmfl.hosts.common.data import majority_rate_of_test_split
    from fs_gmfl.hosts.sim.runner import Simulation

    cfg = load_config(None, run_overrides(args, method, split, seed))
    summary = Simulation(cfg, quiet=True, overwrite=True).run()  # a benchmark re-run replaces its runs
    rows = [r for r in summary["per_round"] if "test_acc" in r]
    at_best_val = max(rows, key=lambda r: (r["val_acc"], -r["round"]))["test_acc"] if "val_acc" in rows[-1] else None
    rounds = [r for r in summary["per_round"] if r["round"] > 0]
    return {"method": method, "split": split, "seed": seed, "final_test_acc": rows[-1]["test_acc"],
            "test_majority_rate": majority_rate_of_test_split(cfg),
            "best_test_acc": max(r["test_acc"] for r in rows), "test_acc_at_best_val": at_best_val,
            "curve": [(r["round"], r["test_acc"]) for r in rows],
            "uplink_bytes_per_round": statistics.fmean(r["uplink_bytes"] for r in rounds),
            "downlink_bytes_per_round": statistics.fmean(r["downlink_bytes"] for r in rounds),
            "uplink_bytes_per_client": statistics.fmean(r["uplink_bytes"] / len(r["clients"]) for r in rounds),
            "downlink_bytes_per_client": statistics.fmean(r["downlink_bytes"] / len(r["clients"]) for r in rounds),
            "median_step_seconds": summary["timing"]["median_step_seconds"], "wall_seconds": summary["wall_seconds"]}


# -- memory and step time (child processes) ----------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _fix_mmap_threshold(threshold: int = 64 * 1024) -> bool:
    """glibc: serve blocks above ``threshold`` by mmap (returned on free) and trim the heap, so RSS tracks live memory."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, threshold) == 1  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def profiled_peak_bytes(fn: Any) -> int:
    """Peak of live tensor bytes allocated while ``fn()`` runs, from the profiler's per-op allocation timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def probe(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """In this (fresh) process: build the method, time local steps, measure peak memory of training."""
    import torch

    from fs_gmfl.config import load_config
    from fs_gmfl.core.adapter import adapter_parameters
    from fs_gmfl.hosts.sim.runner import Simulation
    from fs_gmfl.hosts.sim.training import train_local

    overrides = run_overrides(args, method, "iid", 0)
    cfg = load_config(None, overrides + ["train.local_update_steps", str(args.probe_steps + 2)])
    short = load_config(None, overrides + ["train.local_update_steps", "3"])
    sim = Simulation(cfg, quiet=True)
    sim.setup()
    client, strategy = sim.method.client, sim.method.strategy
    data = sim.data.client_data(0)
    model_bytes = sum(p.numel() * p.element_size() for p in sim.model.parameters())
    # (a) step time over a local round, default allocator (prepare and finish outside the window)
    plan = client.prepare(sim.model, strategy.configure_round(1, [0])[0], {})
    trainable = sum(p.numel() for p in plan.trainable.values())
    stats = train_local(plan, data, cfg, rnd=1, client_id=0)
    client.finish(plan, stats, {})
    # (b) RSS growth over a local round, with large blocks mmap-ed and returned on free (RSS ~ live memory)
    fixed = _fix_mmap_threshold()
    plan = client.prepare(sim.model, strategy.configure_round(1, [0])[0], {})
    rss_before = _rss_kib("VmRSS")
    reset = _reset_peak_rss() and fixed
    rss_stats = train_local(plan, data, cfg, rnd=1, client_id=0)
    rss_peak = _rss_kib("VmHWM")
    client.finish(plan, rss_stats, {})
    # (c) live tensor bytes allocated by three local steps (fresh optimizer), from the profiler
    plan = client.prepare(sim.model, strategy.configure_round(1, [0])[0], {})
    tensor_peak = profiled_peak_bytes(lambda: train_local(plan, data, short, rnd=1, client_id=0))
    client.finish(plan, stats, {})
    return {"method": method, "median_step_seconds": statistics.median(stats.step_seconds[2:]),
            "step_seconds": stats.step_seconds, "rss_before_training_mib": rss_before / 1024,
            "rss_peak_mib": rss_peak / 1024 if reset else None,
            "rss_training_overhead_mib": (rss_peak - rss_before) / 1024 if reset else None,
            "tensor_peak_training_mib": tensor_peak / MIB, "model_mib": model_bytes / MIB,
            "trainable_params": trainable, "head_params": sum(p.numel() for k, p in adapter_parameters(sim.model).items()
                                                              if ".modules_to_save." in k),
            "threads": torch.get_num_threads()}


def run_probes(args: argparse.Namespace, methods: Sequence[str], argv: Sequence[str]) -> list[dict[str, Any]]:
    """One child process per method and repetition, method order rotated each repetition."""
    results = []
    for rep in range(args.probe_reps):
        order = list(methods[rep % len(methods):]) + list(methods[:rep % len(methods)])
        for method in order:
            cmd = [sys.executable, "-m", "fs_gmfl", "bench", "fedkrso", *argv, "--probe-child", method]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["repetition"] = rep
            results.append(row)
            print(f"probe {method} rep {rep}: step {row['median_step_seconds']:.3f} s, tensor peak "
                  f"{row['tensor_peak_training_mib']:.1f} MiB", file=sys.stderr, flush=True)
    return results


# -- summary and outputs -----------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: Sequence[dict[str, Any]], probes: Sequence[dict[str, Any]], methods: Sequence[str],
              splits: Sequence[str]) -> dict[str, Any]:
    """Mean and standard deviation over seeds per method and split; medians of the probes per method."""
    acc: dict[str, Any] = {}
    for method in methods:
        for split in splits:
            rows = [r for r in runs if r["method"] == method and r["split"] == split]
            if not rows:
                continue
            entry = {k: _mean_std([r[k] for r in rows]) for k in
                     ("final_test_acc", "best_test_acc", "test_acc_at_best_val") if rows[0][k] is not None}
            entry.update({k: statistics.fmean(r[k] for r in rows) for k in
                          ("uplink_bytes_per_client", "downlink_bytes_per_client", "uplink_bytes_per_round",
                           "downlink_bytes_per_round")})
            if all(r.get("test_majority_rate") is not None for r in rows):
                entry["test_majority_rate"] = _mean_std([r["test_majority_rate"] for r in rows])
            entry["seeds"] = len(rows)
            acc[f"{method}/{split}"] = entry
    mem: dict[str, Any] = {}
    for method in methods:
        rows = [p for p in probes if p["method"] == method]
        if rows:
            mem[method] = {k: statistics.median(p[k] for p in rows) for k in
                           ("median_step_seconds", "tensor_peak_training_mib", "rss_before_training_mib",
                            "model_mib", "trainable_params") if all(p.get(k) is not None for p in rows)}
            overhead = [p["rss_training_overhead_mib"] for p in rows if p.get("rss_training_overhead_mib") is not None]
            if overhead:
                mem[method]["rss_training_overhead_mib"] = statistics.median(overhead)
                mem[method]["rss_peak_mib"] = statistics.median(p["rss_peak_mib"] for p in rows)
    return {"accuracy": acc, "client": mem}


def markdown_table(summary: dict[str, Any], methods: Sequence[str], splits: Sequence[str]) -> str:
    """The results as markdown tables (with the majority-class reference row of each split)."""
    from fs_gmfl.bench.common import MAJORITY_LABEL

    lines = ["| method | split | final test acc | test acc at best val | best test acc | uplink / client / round "
             "| downlink / client / round |", "|---|---|---|---|---|---|---|"]
    for method in methods:
        for split in splits:
            e = summary["accuracy"].get(f"{method}/{split}")
            if e is None:
                continue
            f, b = e["final_test_acc"], e["best_test_acc"]
            v = e.get("test_acc_at_best_val")
            at_val = f"{v[0]:.4f} ± {v[1]:.4f}" if v else "n/a"
            lines.append(f"| {method} | {split} | {f[0]:.4f} ± {f[1]:.4f} | {at_val} | "
                         f"{b[0]:.4f} ± {b[1]:.4f} | {e['uplink_bytes_per_client'] / MIB:.3f} MiB | "
                         f"{e['downlink_bytes_per_client'] / MIB:.3f} MiB |")
    for split in splits:  # the reference line: the same for every method of a split (same data, split and seeds)
        rates = next((e["test_majority_rate"] for key, e in summary["accuracy"].items()
                      if key.endswith(f"/{split}") and "test_majority_rate" in e), None)
        if rates is not None:
            lines.append(f"| {MAJORITY_LABEL} | {split} | {rates[0]:.4f} ± {rates[1]:.4f} | - | - | - | - |")
    if summary["client"]:
        lines += ["", "| method | trainable params | median step (s) | tensor peak during training (MiB) | "
                  "RSS growth during training (MiB) | RSS before training (MiB) |", "|---|---|---|---|---|---|"]
        for method in methods:
            c = summary["client"].get(method)
            if c is None:
                continue
            overhead = c.get("rss_training_overhead_mib")
            rss = f"{overhead:.1f}" if overhead is not None else "n/a"
            lines.append(f"| {method} | {int(c['trainable_params']):,} | {c['median_step_seconds']:.3f} | "
                         f"{c['tensor_peak_training_mib']:.1f} | {rss} | {c['rss_before_training_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[dict[str, Any]], methods: Sequence[str], splits: Sequence[str], path: Path) -> None:
    """Mean test accuracy (± std over seeds) against round, one panel per split."""
    from fs_gmfl.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for method in methods:
            curves = [dict(r["curve"]) for r in runs if r["method"] == method and r["split"] == split]
            if not curves:
                continue
            rounds = sorted(set.intersection(*(set(c) for c in curves)))
            means = [statistics.fmean(c[x] for c in curves) for x in rounds]
            stds = [statistics.stdev(c[x] for c in curves) if len(curves) > 1 else 0.0 for x in rounds]
            ax.plot(rounds, means, marker=".", label=method)
            ax.fill_between(rounds, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            alpha=0.15)
        ax.set_title(f"MiniLM, Rotten Tomatoes, {split}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "threads_env": os.environ.get("FS_GMFL_THREADS"),
            "load_average": os.getloadavg(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main(argv: Sequence[str]) -> int:
    """Run the benchmark; returns the exit code."""
    args = parse_args(argv)
    if args.probe_child:
        print(json.dumps(probe(args, args.probe_child)))
        return 0
    methods, splits, seeds = args.methods, args.splits, args.seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, start_machine = time.time(), machine()
    runs: list[dict[str, Any]] = []
    if not args.no_accuracy:
        for seed in seeds:
            for split in splits:
                for method in methods:
                    runs.append(accuracy_run(args, method, split, seed))
                    r = runs[-1]
                    print(f"{method} {split} seed {seed}: final {r['final_test_acc']:.4f}, uplink/client "
                          f"{r['uplink_bytes_per_client'] / MIB:.3f} MiB, {r['wall_seconds']:.0f} s",
                          file=sys.stderr, flush=True)
                    _write_json(out / "results.json", {"runs": runs, "partial": True})
    child_argv = [a for a in argv if a != "--no-probe"]
    probes = [] if args.no_probe else run_probes(args, methods, child_argv)
    summary = summarise(runs, probes, methods, splits)
    result = {"args": {k: v for k, v in vars(args).items() if k != "probe_child"}, "machine_start": start_machine,
              "machine_end": machine(), "wall_seconds": time.time() - start, "summary": summary, "runs": runs,
              "probes": probes}
    _write_json(out / "results.json", result)
    (out / "table.md").write_text(markdown_table(summary, methods, splits), encoding="utf-8")
    if runs:
        plot(runs, methods, splits, out / "accuracy.png")
    print(markdown_table(summary, methods, splits))
    print(f"results in {out} ({time.time() - start:.0f} s)", file=sys.stderr)
    return 0


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float), encoding="utf-8")
    tmp.replace(path)
