"""``fs-gmfl bench hafl``: a miniature of HAFL's Table II (Su et al., ICC 2025).

Five methods from ``yaml_configs/hafl_*_minilm_news.yaml`` (HomLoRA r=16,
HomLoRA r=2, ITALoRA, IFALoRA, IFZLoRA): the pre-trained MiniLM classifier on
the 9-outlet news articles, 100 IID clients, 10 per round, r_max 16 and the
paper's 33/33/34 client profiles, over several seeds. Reports test accuracy
at the halfway and final round (mean ± std over seeds), measured uplink and
downlink bytes per round and the uplink ratio against HomLoRA r=16, ITALoRA's
global model truncated to each client rank, and, per client profile, the
median local step time (interleaved on one process) and the peak memory of a
local step (torch profiler). Writes ``results.json``, ``table.md`` and
``hafl_bench.png`` to ``--out``; finished runs are reused unless ``--fresh``.

``--profile-cost`` instead measures one client's local training per HAFL
profile (ITALoRA truncated to each of ``--cost-ranks``, IFALoRA training that
many of 16 components), each in a fresh child process: the median time per
step after warm-up, the child's peak resident memory during training
(``VmHWM``, reset after loading), and the exact bytes of the trained tensors
and the optimizer state (from the tensors themselves). Writes
``profile_cost.json`` and ``profile_cost.md`` to ``--out``.

``--shrinkage`` instead measures what zero-padding aggregation does to the
components only some clients train (:mod:`fs_gmfl.bench.hafl_shrinkage`).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fs_gmfl.bench.client_cost import in_fresh_process, measure_client_cost
from fs_gmfl.bench.common import (MAJORITY_LABEL, earlier_summary, fmt_pm, machine, majority_rates, markdown_table,
                                  mean_curve, peak_step_memory, progress, write_json)
from fs_gmfl.bench.hafl_shrinkage import shrinkage_main
from fs_gmfl.bench.options import BenchParser, count, int_list, non_negative, output_dir, positive, seed_list, subset
from fs_gmfl.config import RunConfig, load_config
from fs_gmfl.core.adapter import adapter_state
from fs_gmfl.core.message import Message
from fs_gmfl.hosts.common.data import federated_data_for
from fs_gmfl.hosts.common.models import AdapterVariants, build_backbone, load_tokenizer
from fs_gmfl.hosts.sim.runner import Simulation
from fs_gmfl.hosts.sim.training import train_local
from fs_gmfl.methods import Method, MethodContext, build_method
from fs_gmfl.plots import MIB, plot_runs

CONFIG_DIR = Path(__file__).resolve().parents[2] / "yaml_configs"
METHODS = {
    "HomLoRA r=16": "hafl_homlora_r16_minilm_news",
    "HomLoRA r=2": "hafl_homlora_r2_minilm_news",
    "ITALoRA": "hafl_italora_minilm_news",
    "IFALoRA": "hafl_ifalora_minilm_news",
    "IFZLoRA": "hafl_ifzlora_minilm_news",
}
REFERENCE = "HomLoRA r=16"
#: r_max of the benchmark's configurations (``llm.adapter.args[0].r``).
R_MAX = 16
#: client profiles timed and measured: (label, method whose configuration builds it, profile name or None).
PROFILE_CLIENTS = [
    ("HomLoRA r=16", "HomLoRA r=16", None), ("HomLoRA r=2", "HomLoRA r=2", None),
    ("ITALoRA r=2", "ITALoRA", "r2"), ("ITALoRA r=4", "ITALoRA", "r4"), ("ITALoRA r=16", "ITALoRA", "r16"),
    ("IFALoRA/IFZLoRA n=2", "IFALoRA", "rho0.875"), ("IFALoRA/IFZLoRA n=4", "IFALoRA", "rho0.75"),
    ("IFALoRA/IFZLoRA n=16", "IFALoRA", "rho0"),
]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Benchmark options."""
    p = BenchParser("hafl", __doc__, quick=QUICK, quick_help="a smoke version: 2 rounds, 1 seed, 2 timing blocks")
    p.add_argument("--seeds", type=seed_list, default="0,1,42", help="comma-separated seeds (the paper's: 0,1,42)")
    p.add_argument("--rounds", type=even_rounds, default=20, help="communication rounds (even)")
    p.add_argument("--methods", type=subset(list(METHODS)), default=",".join(METHODS),
                   help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="extra configuration override for every run (repeatable)")
    p.add_argument("--timing-steps", type=positive, default=4, help="local steps per timing block")
    p.add_argument("--timing-repeats", type=positive, default=5, help="interleaved timing blocks per profile (with --profile-cost: timed "
                        "steps = --timing-steps x --timing-repeats)")
    p.add_argument("--no-profiles", action="store_true", help="skip the per-profile step time and memory")
    p.add_argument("--profile-cost", action="store_true",
                   help="only measure each profile's local step time, peak memory and tensor bytes, one fresh "
                        "child process per profile (no runs); writes profile_cost.json and profile_cost.md")
    p.add_argument("--cost-ranks", type=int_list(count(R_MAX), what="rank"), default="1,2,4,8,16",
                   help=f"with --profile-cost: ITALoRA ranks and IFALoRA trained components (1..{R_MAX})")
    p.add_argument("--cost-warmup", type=non_negative, default=2,
                   help="with --profile-cost: untimed local steps before the timed ones")
    p.add_argument("--shrinkage", action="store_true",
                   help="only measure zero-padding's shrinkage: IFALoRA and IFZLoRA per seed with every round's "
                        "trainer shares and component norms recorded; writes shrinkage.json and shrinkage.md")
    p.add_argument("--fresh", action="store_true", help="rerun runs whose summary.json already exists")
    p.add_argument("--out", type=output_dir, default="bench_out/hafl")
    return p.parse_args(list(argv))


#: what ``--quick`` sets (options given explicitly keep their values).
QUICK = {"rounds": "2", "seeds": "0", "timing_repeats": "2", "timing_steps": "2"}


def even_rounds(text: str) -> int:
    """An even number of rounds, at least 2 (the table reports the halfway round)."""
    rounds = positive(text)
    if rounds % 2:
        raise argparse.ArgumentTypeError(f"{rounds} is odd; the rounds must be even (the table reports the "
                                         "halfway round)")
    return rounds


def eval_freq(rounds: int) -> int:
    """Largest divisor of ``rounds / 2`` not above ``rounds / 4``: the halfway round is always evaluated."""
    half = rounds // 2
    return max(d for d in range(1, half + 1) if half % d == 0 and d <= max(1, rounds // 4))


def method_config(method: str, overrides: Sequence[str]) -> RunConfig:
    """The YAML configuration of ``method`` with ``overrides``."""
    return load_config(CONFIG_DIR / f"{METHODS[method]}.yaml", list(overrides))


def run_or_load(cfg: RunConfig, *, fresh: bool) -> dict[str, Any]:
    """Run ``cfg`` on the simulator, or reuse the summary a previous run of it wrote."""
    summary = earlier_summary(cfg, fresh=fresh)
    if summary is not None:
        progress(f"  reusing {Path(cfg.outdir) / cfg.run_name}")
        return summary
    summary = Simulation(cfg, quiet=True, overwrite=True).run()  # a benchmark re-run replaces its runs
    progress(f"  {cfg.run_name}: {summary['wall_seconds']:.0f}s, test_acc {summary['final'].get('test_acc', 0):.4f}")
    return summary


def acc_at(summary: dict[str, Any], rnd: int, metric: str = "test_acc") -> float:
    """``metric`` at round ``rnd`` of a summary."""
    return next(r[metric] for r in summary["per_round"] if r["round"] == rnd and metric in r)


def per_round_bytes(summaries: Sequence[dict[str, Any]], key: str) -> float:
    """Mean over runs and rounds of ``key`` (e.g. ``uplink_bytes``)."""
    return statistics.fmean(s["comm"][key] / s["rounds"] for s in summaries)


def accuracy_rows(results: dict[str, list[dict[str, Any]]], rounds: int) -> list[list[Any]]:
    """Rows of the main table."""
    ref = per_round_bytes(results[REFERENCE], "uplink_bytes") if REFERENCE in results else None
    rows = []
    for name, summaries in results.items():
        up = per_round_bytes(summaries, "uplink_bytes")
        rows.append([name, fmt_pm([acc_at(s, rounds // 2) for s in summaries]),
                     fmt_pm([acc_at(s, rounds) for s in summaries]), f"{up / MIB:.3f}",
                     f"{up / ref:.3f}" if ref else "-", f"{per_round_bytes(summaries, 'downlink_bytes') / MIB:.3f}",
                     len(summaries)])
    return rows


def per_seed_rows(results: dict[str, list[dict[str, Any]]], rounds: int) -> list[list[Any]]:
    """Final test accuracy of every method in every seed, and its gap to HomLoRA r=16 in the same seed.

    Seeds fix the data split, the client profiles and the sampled clients, so the
    paired gap separates a method's effect from the seed-to-seed spread.
    """
    rows = []
    for name, summaries in results.items():
        finals = [100 * acc_at(s, rounds) for s in summaries]
        row = [name, *(f"{a:.1f}" for a in finals)]
        if REFERENCE in results and name != REFERENCE:
            gaps = [a - 100 * acc_at(r, rounds) for a, r in zip(finals, results[REFERENCE])]
            row.append(f"{statistics.fmean(gaps):+.1f} (" + ", ".join(f"{g:+.1f}" for g in gaps) + ")")
        else:
            row.append("-")
        rows.append(row)
    return rows


def truncation_rows(summaries: Sequence[dict[str, Any]], rounds: int) -> list[list[Any]]:
    """ITALoRA's global model and its truncations to the client ranks (the paper's degradation figure)."""
    final = summaries[0]["per_round"][-1]
    names = sorted((k.split("/")[0] for k in final if k.startswith("rank_") and k.endswith("/test_acc")),
                   key=lambda n: int(n.split("_")[1]))
    rows = [[f"truncated to rank {n.split('_')[1]}", fmt_pm([acc_at(s, rounds // 2, f"{n}/test_acc") for s in summaries]),
             fmt_pm([acc_at(s, rounds, f"{n}/test_acc") for s in summaries])] for n in names]
    rows.append(["global (rank 16)", fmt_pm([acc_at(s, rounds // 2) for s in summaries]),
                 fmt_pm([acc_at(s, rounds) for s in summaries])])
    return rows


# -- per-profile step time and memory ---------------------------------------------------------------
def profile_clients(args: argparse.Namespace, overrides: Sequence[str]) -> list[tuple[str, Method, Any, Message]]:
    """For each profile of :data:`PROFILE_CLIENTS`: its method, model and a real round-1 downlink."""
    built: dict[str, tuple[Method, Any]] = {}
    clients = []
    for label, method, profile_name in PROFILE_CLIENTS:
        if method not in built:
            cfg = method_config(method, [*overrides, "train.batch_or_epoch", "batch",
                                         "train.local_update_steps", str(args.timing_steps)])
            backbone = build_backbone(cfg, federated_data_for(cfg, load_tokenizer(cfg)).num_labels)
            variants = AdapterVariants(backbone.model, cfg, backbone.target_modules)
            built[method] = (build_method(MethodContext(cfg, adapter_state(backbone.model), variants)), backbone.model)
        m, model = built[method]
        rows = m.info["profiles"]
        cid = next(r for r in rows if profile_name is None or r["name"] == profile_name)["client_ids"][0]
        clients.append((label, m, model, m.strategy.configure_round(1, [cid])[cid]))
    return clients


def profile_measurements(args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Median local step time (interleaved blocks, first step of each dropped) and peak step memory per profile."""
    clients = profile_clients(args, overrides)
    batch_mode = [*overrides, "train.batch_or_epoch", "batch", "train.local_update_steps"]
    cfg = method_config(REFERENCE, [*batch_mode, str(args.timing_steps)])
    one_step = method_config(REFERENCE, [*batch_mode, "1"])
    data = federated_data_for(cfg, load_tokenizer(cfg)).client_data(0)
    times: dict[str, list[float]] = {label: [] for label, *_ in clients}
    out: dict[str, dict[str, Any]] = {}
    for rep in range(args.timing_repeats):
        for label, method, model, message in clients:
            plan = method.client.prepare(model, message.detached_copy(), {})
            stats = train_local(plan, data, cfg, rnd=rep + 1, client_id=0)
            times[label].extend(stats.step_seconds[1:])
            method.client.finish(plan, stats, {})
    for label, method, model, message in clients:
        plan = method.client.prepare(model, message.detached_copy(), {})
        holder: dict[str, Any] = {}
        peak = peak_step_memory(lambda: holder.setdefault("stats", train_local(plan, data, one_step, rnd=99,
                                                                                client_id=0)))
        method.client.finish(plan, holder["stats"], {})
        trainable = sum(p.numel() for p in plan.trainable.values())
        trained = sum(int(plan.grad_masks[k].sum()) if k in plan.grad_masks else p.numel()
                      for k, p in plan.trainable.items())
        out[label] = {"median_step_seconds": statistics.median(times[label]), "steps_timed": len(times[label]),
                      "peak_step_bytes": peak, "trainable_params": trainable, "trained_params": trained}
    base = out[REFERENCE]["median_step_seconds"]
    for row in out.values():
        row["step_time_vs_homlora_r16"] = row["median_step_seconds"] / base
    return out


def profile_rows(measured: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Rows of the per-profile table."""
    return [[label, f"{m['trainable_params']:,}", f"{m['trained_params']:,}",
             f"{m['median_step_seconds'] * 1000:.0f}", f"{m['step_time_vs_homlora_r16']:.2f}",
             f"{m['peak_step_bytes'] / MIB:.1f}"] for label, m in measured.items()]


# -- per-profile cost, one fresh process per profile (--profile-cost) -----------------------------------------
def cost_profiles(ranks: Sequence[int]) -> list[tuple[str, str, list[str]]]:
    """(label, method, configuration overrides) of every profile whose cost ``--profile-cost`` measures.

    Each configuration has a single profile (share 1.0), so client 0 has it.
    """
    out = [(f"ITALoRA r={r}", "ITALoRA", ["hafl.profiles", f"[{{share: 1.0, rank: {r}}}]"]) for r in ranks]
    out += [(f"IFALoRA n={n}", "IFALoRA", ["hafl.profiles", f"[{{share: 1.0, freeze_ratio: {1 - n / R_MAX}}}]"])
            for n in ranks]
    return out


def measure_profile_cost(method: str, overrides: Sequence[str], warmup: int, timed: int) -> dict[str, Any]:
    """One client's local training under ``method`` + ``overrides`` (:func:`measure_client_cost`), in this process."""
    cfg = method_config(method, [*overrides, "train.batch_or_epoch", "batch",
                                 "train.local_update_steps", str(warmup + timed)])
    return {"method": method, "overrides": list(overrides), **measure_client_cost(cfg, warmup)}


def profile_costs(args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """:func:`measure_profile_cost` of every profile of :func:`cost_profiles`, each in a fresh child process."""
    timed = args.timing_steps * args.timing_repeats
    out: dict[str, dict[str, Any]] = {}
    for label, method, profile in cost_profiles(args.cost_ranks):
        progress(f"[bench hafl] cost of {label} ({args.cost_warmup} + {timed} steps, fresh process)")
        out[label] = in_fresh_process(measure_profile_cost, method, [*overrides, *profile], args.cost_warmup, timed)
    return out


def cost_rows(measured: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Rows of the per-profile cost table (bytes of the trained tensors in KiB, memory in MiB)."""
    if not measured:
        return []
    # the first profile with the most trainable parameters (ITALoRA at the largest rank) is the reference
    full = max(measured.values(), key=lambda m: m["trainable_params"])["median_step_seconds"]
    return [[label, f"{m['trainable_params']:,}", f"{m['trained_params']:,}",
             f"{m['median_step_seconds'] * 1000:.0f} ({m['min_step_seconds'] * 1000:.0f}-"
             f"{m['max_step_seconds'] * 1000:.0f})", f"{m['median_step_seconds'] / full:.2f}",
             f"{m['param_bytes'] / 1024:.1f}", f"{m['optimizer_state_bytes'] / 1024:.1f}",
             f"{m['loading_peak_rss_bytes'] / MIB:.0f}", f"{m['rss_before_training_bytes'] / MIB:.0f}",
             f"{m['peak_rss_bytes'] / MIB:.0f}" + ("" if m["peak_rss_reset_before_training"] else " (whole process)"),
             f"{m['loadavg_1min']:.2f}"] for label, m in measured.items()]


def profile_cost_main(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """``--profile-cost``: measure, then write ``profile_cost.json`` and ``profile_cost.md``."""
    out = Path(args.out)
    measured = profile_costs(args, extra)
    steps = args.timing_steps * args.timing_repeats
    text = (f"Local training of client 0 per profile, one fresh process each ({args.cost_warmup} warm-up + {steps} "
            "timed steps; step ms: median (min-max); ratio: median step over the largest profile's; KiB: exact "
            "bytes of the trained tensors and of the optimizer's state (the gradients take the parameters' bytes); "
            "RSS: the process's resident memory before training and its peak during training, VmHWM reset "
            "after loading):\n\n")
    text += markdown_table(["client profile", "trainable params", "trained params", "step ms", "ratio",
                            "param KiB", "optimizer state KiB", "loading peak RSS MiB", "RSS before MiB",
                            "peak RSS in training MiB",
                            "load (1 min)"], cost_rows(measured))
    write_json(out / "profile_cost.json", {"args": vars(args), "machine": machine(), "profiles": measured})
    (out / "profile_cost.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    progress(f"[bench hafl] wrote {out / 'profile_cost.json'}, {out / 'profile_cost.md'}")
    return 0


def main(argv: Sequence[str]) -> int:
    """Run the HAFL benchmark; returns an exit code."""
    args = parse_args(argv)
    out = Path(args.out)
    seeds = args.seeds
    extra = [word for pair in args.set for word in pair]
    if args.profile_cost:
        return profile_cost_main(args, extra)
    if args.shrinkage:
        return shrinkage_main(args, method_config, extra)
    common = ["federate.total_round_num", str(args.rounds), "eval.freq", str(eval_freq(args.rounds)),
              "outdir", str(out / "runs"), *extra]
    methods = args.methods
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in seeds:
        for name in methods:
            progress(f"[bench hafl] seed {seed}: {name}")
            cfg = method_config(name, [*common, "seed", str(seed), "expname", f"{METHODS[name]}_s{seed}"])
            results[name].append(run_or_load(cfg, fresh=args.fresh))
    measured = {}
    if not args.no_profiles:
        progress("[bench hafl] per-profile step time and memory")
        measured = profile_measurements(args, extra)
    majority = majority_rates([method_config(methods[0], [*common, "seed", str(seed)]) for seed in seeds])
    text = markdown_table(["method", f"test acc % @ round {args.rounds // 2}", f"test acc % @ round {args.rounds}",
                           "uplink MiB / round", f"uplink vs {REFERENCE}", "downlink MiB / round", "seeds"],
                          [*accuracy_rows(results, args.rounds),
                           [MAJORITY_LABEL, fmt_pm(majority), fmt_pm(majority), "-", "-", "-", len(seeds)]])
    text += f"\n\nTest acc % at round {args.rounds} per seed:\n\n" + markdown_table(
        ["method", *(f"seed {s}" for s in seeds), f"gap to {REFERENCE}: mean (per seed)"],
        [*per_seed_rows(results, args.rounds), [MAJORITY_LABEL, *(f"{r * 100:.1f}" for r in majority), "-"]])
    if "ITALoRA" in results:
        text += "\n\nITALoRA global model truncated to the client ranks (test acc %):\n\n" + markdown_table(
            ["model", f"@ round {args.rounds // 2}", f"@ round {args.rounds}"],
            truncation_rows(results["ITALoRA"], args.rounds))
    if measured:
        text += "\n\nLocal training per client profile (interleaved timing, one process; peak = torch profiler):\n\n"
        text += markdown_table(["client profile", "trainable params", "trained params", "median step ms",
                                f"vs {REFERENCE}", "peak step MiB"], profile_rows(measured))
    plot = plot_runs([(name, mean_curve(s)) for name, s in results.items()], out / "hafl_bench.png",
                     title=f"MiniLM on news articles, 100 clients, 10/round, mean of {len(seeds)} seeds")
    write_json(out / "results.json", {
        "args": vars(args), "machine": machine(), "profiles": measured, "test_majority_rate": majority,
        "runs": {n: [{k: s[k] for k in ("final", "comm", "timing", "per_round", "method_info", "wall_seconds")}
                     for s in v] for n, v in results.items()}})
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    progress(f"[bench hafl] wrote {out / 'results.json'}, {out / 'table.md'}, {plot}")
    return 0
