"""``fs-gmfl bench llm``: federated instruction tuning of a real pre-trained LLM, every LoRA method side by side.

SmolLM2-135M-Instruct (``model.type: smollm2``) on the exact-match math tasks
of the OpenAI evals registry (``data.type: evals_math``, the task as
``category``), split over the clients by a Dirichlet over categories (or
``meta``). Methods: FedIT and FFA-LoRA each with and without GMFL, ITALoRA and IFALoRA (HAFL
with the paper's three client profiles, 33/33/34 % at 1/4, 1/2 and all of
r_max), FedEx-LoRA and LoRA-A2 each with and without GMFL, and FLoRA with
HAFL's rank profiles as its heterogeneous client ranks. Seeds run method
after method (interleaved), so slow phases of a shared machine spread over
every method.

Reported per method (mean ± std over seeds): exact match and response-token
loss of the base model (round 0, the same for every method of a seed) and at
the end, uplink and downlink bytes, median local step time, peak RSS (each
run in a fresh process), and the evaluation time against the round's
training time. A precision block times
fp32, bf16 weights (``train.is_enable_half``) and bf16 autocast on the same
client data, interleaved, with the torch profiler's peak step memory.

Writes ``results.json``, ``table.md`` and ``llm_bench.png`` (exact match
against round and cumulative uplink; test loss curves) to ``--out``.
``--quick`` runs a tiny random Llama on generated arithmetic rows in about a
minute (what the test suite runs).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fs_gmfl.bench.common import (earlier_summary, fmt_pm, machine, markdown_table, mean_curve, peak_step_memory,
                                  progress, write_json)
from fs_gmfl.bench.options import BenchParser, output_dir, positive, seed_list, subset
from fs_gmfl.config import RunConfig, load_config
from fs_gmfl.hosts.sim.runner import Simulation, precision_of
from fs_gmfl.plots import MIB, plot_runs

CONFIG_DIR = Path(__file__).resolve().parents[2] / "yaml_configs" / "llm"
BASE_CONFIG = CONFIG_DIR / "smollm2_fedit.yaml"


def rank_profiles(r_max: int) -> str:
    """HAFL's paper profiles by rank: a third of the clients each at r_max/4, r_max/2 and r_max."""
    return (f"[{{share: 0.33, rank: {max(1, r_max // 4)}}}, {{share: 0.33, rank: {max(1, r_max // 2)}}}, "
            f"{{share: 0.34, rank: {r_max}}}]")


def hafl_overrides(scheme: str, r_max: int) -> list[str]:
    """HAFL with the paper's profiles: a third each at r_max/4, r_max/2 and r_max components."""
    if scheme == "truncation":
        profiles = rank_profiles(r_max)
    else:
        profiles = ("[{share: 0.33, freeze_ratio: 0.75}, {share: 0.33, freeze_ratio: 0.5}, "
                    "{share: 0.34, freeze_ratio: 0.0}]")
    return ["federate.method", "hafl", "hafl.scheme", scheme, "hafl.aggregation", "adaptive", "hafl.profiles",
            profiles]


#: the benchmarked methods, in table order (see :func:`method_overrides`).
METHODS = ("FedIT", "FedIT+GMFL", "FFA-LoRA", "FFA-LoRA+GMFL", "ITALoRA", "IFALoRA", "FedEx-LoRA", "FedEx-LoRA+GMFL",
           "LoRA-A2", "LoRA-A2+GMFL", "FLoRA (hetero r)")
#: what ``--quick`` sets besides the tiny model and data (options given explicitly keep their values).
QUICK = {"seeds": "0", "timing_steps": "2", "timing_repeats": "2"}


def method_overrides(r_max: int, gmfl_period: int) -> dict[str, list[str]]:
    """Each benchmarked method as overrides of the base configuration.

    GMFL over a base refreshes every ``gmfl_period`` rounds (LoRA-A2 + GMFL re-masks every round and uses the
    period in its ratio schedule, docs/methods/lora_a2.md); FLoRA's clients train HAFL's rank profiles.
    """
    gmfl = ["gmfl.use", "True", "gmfl.period", str(gmfl_period)]
    return {
        "FedIT": ["federate.method", "fedit"],
        "FedIT+GMFL": ["federate.method", "fedit", *gmfl],
        "FFA-LoRA": ["federate.method", "ffa_lora"],
        "FFA-LoRA+GMFL": ["federate.method", "ffa_lora", *gmfl],
        "ITALoRA": hafl_overrides("truncation", r_max),
        "IFALoRA": hafl_overrides("freezing", r_max),
        "FedEx-LoRA": ["federate.method", "fedex_lora"],
        "FedEx-LoRA+GMFL": ["federate.method", "fedex_lora", *gmfl],
        "LoRA-A2": ["federate.method", "lora_a2"],
        "LoRA-A2+GMFL": ["federate.method", "lora_a2", *gmfl],
        "FLoRA (hetero r)": ["federate.method", "flora", "flora.profiles", rank_profiles(r_max)],
    }


def run_name(method: str, seed: int) -> str:
    """A run directory name for ``method`` and ``seed`` (``fedit_gmfl_s0``, ``flora_hetero_r_s1``)."""
    stem = re.sub(r"[^a-z0-9_]+", "_", method.lower().replace("+", "_").replace("-", "")).strip("_")
    return f"{stem}_s{seed}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Benchmark options."""
    p = BenchParser("llm", __doc__, quick=QUICK, quick_help="tiny random Llama on generated arithmetic rows, 1 seed")
    p.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated seeds")
    p.add_argument("--methods", type=subset(METHODS), default=",".join(METHODS),
                   help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--rounds", type=positive, default=None, help="federate.total_round_num (default: the config's)")
    p.add_argument("--gmfl-period", type=positive, default=2, help="GMFL refresh period for the short schedule")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="extra configuration override for every run (repeatable)")
    p.add_argument("--timing-steps", type=positive, default=4, help="local steps per precision timing block")
    p.add_argument("--timing-repeats", type=positive, default=3, help="interleaved timing blocks per precision")
    p.add_argument("--no-timing", action="store_true", help="skip the precision timing block")
    p.add_argument("--fresh", action="store_true", help="rerun runs whose summary.json already exists (replacing "
                   "them; without it, --out may hold only earlier runs of the same configuration)")
    p.add_argument("--out", type=output_dir, default="bench_out/llm")
    return p.parse_args(list(argv))


def quick_overrides(out: Path) -> list[str]:
    """A tiny random Llama and generated FederatedScope-LLM arithmetic rows (no packages needed)."""
    from fs_gmfl.hosts.fs.assets import arithmetic_rows

    data = out / "data" / "arithmetic.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(120, seed=0)), encoding="utf-8")
    return ["model.type", "tiny_llama", "model.hidden_size", "32", "model.vocab_size", "300",
            "data.type", "arithmetic.jsonl@llm", "data.root", str(data.parent), "data.splitter", "meta",
            "data.splitter_args", "[]",
            "federate.client_num", "3", "federate.sample_client_num", "3", "federate.total_round_num", "2",
            "train.local_update_steps", "3", "llm.tok_len", "64", "eval.generation_rows", "12", "eval.freq", "2",
            "train.is_enable_half", "False"]


def base_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    """Overrides every run shares."""
    words = quick_overrides(out) if args.quick else []
    if args.rounds is not None:
        words += ["federate.total_round_num", str(args.rounds)]
    return [*words, "outdir", str(out / "runs"), *[w for pair in args.set for w in pair]]


def _run_in_child(overrides: list[str]) -> None:
    """Child-process body: one run of the benchmark configuration with ``overrides``."""
    Simulation(load_config(BASE_CONFIG, overrides), quiet=True).run()


def run_config(cfg: RunConfig, overrides: list[str]) -> dict[str, Any]:
    """Run ``cfg`` in a fresh process (so ``peak_rss_bytes`` is this run's own) and return its summary.

    What an unfinished or ``--fresh``-replaced run left in the run directory is removed first.
    """
    path = Path(cfg.outdir) / cfg.run_name / "summary.json"
    if path.parent.exists():
        shutil.rmtree(path.parent)
    child = multiprocessing.get_context("spawn").Process(target=_run_in_child, args=(overrides,))
    child.start()
    child.join()
    if child.exitcode != 0 or not path.is_file():
        raise RuntimeError(f"benchmark run {cfg.run_name} failed (exit {child.exitcode})")
    summary = json.loads(path.read_text(encoding="utf-8"))
    final = summary["final"]
    progress(f"  {cfg.run_name}: {summary['wall_seconds']:.0f}s, exact match {final.get('test_exact_match', 0):.3f}, "
             f"token loss {final.get('test_token_loss', 0):.3f}, peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB")
    return summary


#: one run of the benchmark: (method, seed, configuration, the overrides that build it).
PlannedRun = tuple[str, int, RunConfig, list[str]]


def planned_runs(args: argparse.Namespace, overrides: list[str], r_max: int) -> list[PlannedRun]:
    """Every run, seed after seed and method after method: ``(method, seed, configuration, its overrides)``."""
    methods = method_overrides(r_max, args.gmfl_period)
    plan = []
    for seed in args.seeds:
        for method in args.methods:
            words = [*overrides, *methods[method], "seed", str(seed), "expname", run_name(method, seed)]
            plan.append((method, seed, load_config(BASE_CONFIG, words), words))
    return plan


def at(summary: dict[str, Any], rnd: int, metric: str) -> float:
    """``metric`` at round ``rnd``."""
    return next(r[metric] for r in summary["per_round"] if r["round"] == rnd and metric in r)


def eval_cost(summary: dict[str, Any]) -> float:
    """Median over evaluated rounds of evaluation seconds / that round's training seconds."""
    ratios = [r["eval_seconds"] / r["train_seconds"] for r in summary["per_round"]
              if "eval_seconds" in r and r.get("train_seconds")]
    return statistics.median(ratios) if ratios else float("nan")


def method_rows(results: dict[str, list[dict[str, Any]]]) -> list[list[Any]]:
    """One table row per method: metrics at round 0 and at the end, bytes, time, memory."""
    rows = []
    for method, summaries in results.items():
        last = summaries[0]["rounds"]
        steps = [s["timing"]["median_step_seconds"] for s in summaries if s["timing"]["median_step_seconds"]]
        rows.append([method,
                     fmt_pm([at(s, 0, "test_exact_match") for s in summaries]),
                     fmt_pm([at(s, last, "test_exact_match") for s in summaries]),
                     fmt_pm([at(s, 0, "test_token_loss") for s in summaries], scale=1, digits=3),
                     fmt_pm([at(s, last, "test_token_loss") for s in summaries], scale=1, digits=3),
                     f"{statistics.fmean(s['comm']['uplink_bytes'] for s in summaries) / MIB:.2f}",
                     f"{statistics.fmean(s['comm']['downlink_bytes'] for s in summaries) / MIB:.2f}",
                     f"{statistics.median(steps):.3f}" if steps else "-",
                     f"{max(s['peak_rss_bytes'] for s in summaries) / 2**30:.2f}",
                     f"{statistics.median(eval_cost(s) for s in summaries):.2f}"])
    return rows


def seed_rows(results: dict[str, list[dict[str, Any]]], seeds: Sequence[int]) -> list[list[Any]]:
    """Per seed: the base model's exact match and each method's final exact match and gap to it (points)."""
    rows = []
    for i, seed in enumerate(seeds):
        first = next(iter(results.values()))[i]
        base = at(first, 0, "test_exact_match")
        cells = [seed, f"{100 * base:.1f}"]
        for summaries in results.values():
            final = at(summaries[i], summaries[i]["rounds"], "test_exact_match")
            cells.append(f"{100 * final:.1f} ({100 * (final - base):+.1f})")
        rows.append(cells)
    return rows


def precision_timing(overrides: Sequence[str], *, steps: int, repeats: int) -> dict[str, Any]:
    """Median step time and peak step memory of fp32, bf16 weights and bf16 autocast, interleaved.

    Each repeat trains ``steps`` steps of client 0's data per precision in
    turn on its own model; the first step of a block (optimizer state
    creation) is dropped. Losses of the first block are kept to compare the
    precisions' numerics.
    """
    from fs_gmfl.core.adapter import adapter_parameters
    from fs_gmfl.core.protocol import LocalPlan
    from fs_gmfl.hosts.common.data import federated_data_for
    from fs_gmfl.hosts.common.models import build_backbone, prepare_for_training
    from fs_gmfl.hosts.sim.training import train_local

    variants = {"fp32": ["train.autocast", "none", "train.is_enable_half", "False"],
                "bf16 weights (is_enable_half)": ["train.autocast", "none", "train.is_enable_half", "True"],
                "bf16 autocast": ["train.autocast", "bfloat16", "train.is_enable_half", "False"]}
    setups = {}
    for name, extra in variants.items():
        cfg = load_config(BASE_CONFIG, [*overrides, *extra, "train.local_update_steps", str(steps)])
        backbone = build_backbone(cfg)
        model = prepare_for_training(backbone.model, cfg, backbone.model.device)
        data = federated_data_for(cfg, backbone.tokenizer).client_data(0)
        trainable = {k: p for k, p in adapter_parameters(model).items() if "lora_" in k}
        setups[name] = (cfg, model, data, trainable)
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, float] = {}
    peaks: dict[str, int] = {}
    for rep in range(repeats):
        for name, (cfg, model, data, trainable) in setups.items():
            plan = LocalPlan(model=model, trainable=trainable)
            holder: dict[str, Any] = {}

            def block(plan=plan, data=data, cfg=cfg, rep=rep) -> None:
                holder["stats"] = train_local(plan, data, cfg, rnd=1, client_id=rep)

            if rep == 0:
                peaks[name] = peak_step_memory(block)
                losses[name] = holder["stats"].mean_loss
            else:
                block()
                times[name].extend(holder["stats"].step_seconds[1:])
    reference = statistics.median(times["fp32"]) if times["fp32"] else float("nan")
    return {name: {"median_step_seconds": statistics.median(t) if t else float("nan"),
                   "ratio_to_fp32": (statistics.median(t) / reference) if t else float("nan"),
                   "steps_timed": len(t), "peak_step_bytes": peaks[name], "first_block_mean_loss": losses[name]}
            for name, t in times.items()}


def write_outputs(out: Path, results: dict[str, list[dict[str, Any]]], seeds: Sequence[int],
                  timing: dict[str, Any] | None, cfg: RunConfig, wall: float) -> str:
    """``results.json``, ``table.md`` and ``llm_bench.png``; returns the table text."""
    text = (f"Model {cfg.model.type}, data {cfg.data.type} ({cfg.data.splitter} over {cfg.federate.client_num} "
            f"clients, {cfg.federate.clients_per_round()} per round), {cfg.federate.total_round_num} rounds x "
            f"{cfg.train.local_update_steps} local steps of batch {cfg.dataloader.batch_size}, LoRA r "
            f"{cfg.lora.r} on {', '.join(cfg.lora.target_modules) or 'default modules'}, precision "
            f"{precision_of(cfg)}; seeds {', '.join(map(str, seeds))}; "
            f"exact match on {cfg.eval.generation_rows or 'all'} test rows (greedy, "
            f"{cfg.eval.max_new_tokens} new tokens); {wall / 60:.0f} min in all.\n\n")
    text += markdown_table(["method", "EM base %", "EM final %", "token loss base", "token loss final",
                            "uplink MiB", "downlink MiB", "median step s", "peak RSS GiB", "eval / round time"],
                           method_rows(results))
    text += "\n\nPer seed: final exact match % (gap to the base model, points):\n\n"
    text += markdown_table(["seed", "base", *results], seed_rows(results, seeds))
    if timing:
        text += "\n\nPrecision (client 0's data, interleaved blocks, first step of each block dropped):\n\n"
        text += markdown_table(["precision", "median step s", "ratio to fp32", "peak step MiB", "first-block loss"],
                               [[n, f"{m['median_step_seconds']:.3f}", f"{m['ratio_to_fp32']:.2f}",
                                 f"{m['peak_step_bytes'] / MIB:.0f}", f"{m['first_block_mean_loss']:.4f}"]
                                for n, m in timing.items()])
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    write_json(out / "results.json", {"machine": machine(), "seeds": list(seeds), "timing": timing,
                                      "runs": {m: [{k: s[k] for k in ("final", "comm", "per_round", "timing",
                                                                      "peak_rss_bytes", "wall_seconds")}
                                                   for s in ss] for m, ss in results.items()}})
    curves = [(m, mean_curve(ss, "test_exact_match")) for m, ss in results.items()]
    plot_runs(curves, out / "llm_bench.png", metric="test_exact_match",
              title=f"{cfg.model.type} on {cfg.data.type}: exact match (mean over seeds)")
    loss_curves = [(m, mean_curve(ss, "test_token_loss")) for m, ss in results.items()]
    plot_runs(loss_curves, out / "llm_bench_loss.png", metric="test_token_loss",
              title=f"{cfg.model.type} on {cfg.data.type}: test response-token loss (mean over seeds)")
    return text


def main(argv: Sequence[str]) -> int:
    """Run the benchmark; print the table."""
    args = parse_args(argv)
    out = Path(args.out)
    overrides = base_overrides(args, out)
    reference = load_config(BASE_CONFIG, overrides)
    plan = planned_runs(args, overrides, reference.lora.r)
    earlier = [earlier_summary(cfg, fresh=args.fresh) for _, _, cfg, _ in plan]  # refuses foreign runs up front
    start = time.time()
    timing = None
    if not args.no_timing:
        progress("[bench llm] precision timing")
        timing = precision_timing(overrides, steps=args.timing_steps, repeats=args.timing_repeats)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for (method, seed, cfg, words), summary in zip(plan, earlier):
        if summary is None:
            progress(f"[bench llm] seed {seed}: {method}")
            summary = run_config(cfg, words)
        else:
            progress(f"[bench llm] seed {seed}: {method}: reusing {Path(cfg.outdir) / cfg.run_name}")
        results[method].append(summary)
    print(write_outputs(out, results, args.seeds, timing, reference, time.time() - start))
    return 0
