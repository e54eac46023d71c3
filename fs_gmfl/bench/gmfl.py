"""``fs-gmfl bench gmfl``: FedIT, FFA-LoRA, HAFL and FedHFT, each with and without GMFL.

Pre-trained MiniLM classifier on real data (16-class health tweets by default),
20 clients, 2 per round,
Dirichlet(0.5) label split, a shortened GMFL schedule (period 4 over 24
rounds, ``gmfl.max_ratio`` at its default 0.95, which 24 rounds never reach),
several seeds. Reports accuracy (mean ± std over seeds), total
uplink bytes, the measured uplink saving against the saving the freeze
schedule predicts, per-round median local step times, and an interleaved
step-time micro-benchmark of masked vs unmasked local training (including
GMFL at ratio 0). Writes ``results.json``, ``table.md`` and
``gmfl_bench.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fs_gmfl.bench.common import (MAJORITY_LABEL, fmt_pm, machine, majority_rates, markdown_table, mean_curve, progress,
                                  run_config, write_json)
from fs_gmfl.bench.options import (BenchParser, fraction, non_negative, output_dir, positive, positive_real,
                                   seed_list, subset)
from fs_gmfl.comm_estimate import estimate
from fs_gmfl.config import RunConfig, load_config
from fs_gmfl.core.adapter import adapter_parameters, adapter_state
from fs_gmfl.core.fedavg import LoraClient, mask_candidate_keys
from fs_gmfl.core.gmfl import select_frozen
from fs_gmfl.core.gmfl.wrapper import gmfl_lora_client
from fs_gmfl.core.message import Message, pack_bits
from fs_gmfl.core.protocol import ClientAlgorithm
from fs_gmfl.hosts.common.data import federated_data_for
from fs_gmfl.hosts.common.models import build_backbone, load_tokenizer
from fs_gmfl.hosts.sim.training import train_local
from fs_gmfl.plots import MIB, plot_runs

#: HAFL's IFALoRA (freezing scheme, adaptive rank-1 aggregation) with the paper's 33/33/34 clients training 1/8,
#: 1/4 and all of the rank-r components, and a trained head (FedIT trains its head too).
HAFL_IFALORA = ["federate.method", "hafl", "hafl.scheme", "freezing", "hafl.train_head", "True", "hafl.profiles",
                "[{share: 0.33, freeze_ratio: 0.875}, {share: 0.33, freeze_ratio: 0.75}, "
                "{share: 0.34, freeze_ratio: 0}]"]
#: FedHFT with its default levels and one cluster, evaluated as the global model (no local validation shards).
FEDHFT_GLOBAL = ["federate.method", "fedhft", "fedhft.eval", "global"]
METHODS = [
    ("FedIT", ["federate.method", "fedit"]),
    ("FedIT+GMFL", ["federate.method", "fedit", "gmfl.use", "True"]),
    ("FFA-LoRA", ["federate.method", "ffa_lora"]),
    ("FFA-LoRA+GMFL", ["federate.method", "ffa_lora", "gmfl.use", "True"]),
    ("FedIT+GMFL(random)", ["federate.method", "fedit", "gmfl.use", "True", "gmfl.selection", "random"]),
    ("HAFL", HAFL_IFALORA),
    ("HAFL+GMFL", [*HAFL_IFALORA, "gmfl.use", "True"]),
    ("FedHFT", FEDHFT_GLOBAL),
    ("FedHFT+GMFL", [*FEDHFT_GLOBAL, "gmfl.use", "True"]),
]
#: the methods run by default (the random-selection ablation and the HAFL / FedHFT compositions are opt-in
#: through ``--methods``).
DEFAULT_METHODS = ("FedIT", "FedIT+GMFL", "FFA-LoRA", "FFA-LoRA+GMFL")
METHOD_NAMES = [name for name, _ in METHODS]
#: what ``--quick`` sets (options given explicitly keep their values).
QUICK = {"rounds": "8", "period": "2", "seeds": "0", "steps": "3", "timing_repeats": "2"}
BASE_OF = {"FedIT+GMFL": "FedIT", "FFA-LoRA+GMFL": "FFA-LoRA", "FedIT+GMFL(random)": "FedIT", "HAFL+GMFL": "HAFL",
           "FedHFT+GMFL": "FedHFT"}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Benchmark options."""
    p = BenchParser("gmfl", __doc__, quick=QUICK, quick_help="a small smoke version (8 rounds, 1 seed)")
    p.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated seeds")
    p.add_argument("--methods", type=subset(METHOD_NAMES), default=",".join(DEFAULT_METHODS),
                   help="comma-separated subset of: " + ", ".join(METHOD_NAMES)
                        + " (a GMFL variant run without its base method gets no measured saving)")
    p.add_argument("--rounds", type=positive, default=24)
    p.add_argument("--period", type=positive, default=4, help="GMFL refresh period")
    p.add_argument("--clients", type=positive, default=20)
    p.add_argument("--per-round", type=positive, default=2)
    p.add_argument("--alpha", type=positive_real, default=0.5, help="Dirichlet concentration of the label split")
    p.add_argument("--steps", type=positive, default=10, help="local steps per round")
    p.add_argument("--batch-size", type=positive, default=16)
    p.add_argument("--lr", type=positive_real, default=1e-3)
    p.add_argument("--rank", type=positive, default=16)
    p.add_argument("--dataset", default="health_tweets",
                   help="data.type (health_tweets: 16 classes; binary rotten_tomatoes does not learn under this "
                        "split, see BENCHMARKS.md)")
    p.add_argument("--subsample", type=fraction, default=0.1, help="data.subsample")
    p.add_argument("--model", default="minilm", help="model.type (minilm: the pre-trained MiniLM)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="extra configuration override (repeatable)")
    p.add_argument("--tok-len", type=positive, default=48)
    p.add_argument("--eval-freq", type=positive, default=4)
    p.add_argument("--timing-steps", type=positive, default=12, help="steps per timing block")
    p.add_argument("--timing-repeats", type=non_negative, default=5,
                   help="interleaved timing blocks per variant (0 skips the step-time micro-benchmark)")
    p.add_argument("--out", type=output_dir, default="bench_out/gmfl")
    args = p.parse_args(list(argv))
    args.methods = [name for name in METHOD_NAMES if name in args.methods]  # benchmark order
    return args


def common_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    """Configuration shared by every benchmarked run."""
    return [
        "model.type", args.model, "data.type", args.dataset, "data.subsample", str(args.subsample),
        "llm.tok_len", str(args.tok_len),
        "federate.client_num", str(args.clients), "federate.sample_client_num", str(args.per_round),
        "federate.total_round_num", str(args.rounds), "data.splitter", "lda",
        "data.splitter_args", f"[{{alpha: {args.alpha}}}]", "train.local_update_steps", str(args.steps),
        "dataloader.batch_size", str(args.batch_size), "train.optimizer.lr", str(args.lr),
        "llm.adapter.args", f"[{{r: {args.rank}, lora_alpha: {2 * args.rank}}}]", "gmfl.period", str(args.period),
        "eval.freq", str(args.eval_freq), "outdir", str(out / "runs"),
        *[word for pair in args.set for word in pair],
    ]


def predicted_saving(cfg: RunConfig) -> tuple[float, float]:
    """Time-averaged uplink saving the freeze schedule predicts (bounds; equal when units have equal sizes).

    For methods with client profiles (HAFL, FedHFT) the saving is the expectation over the profiles' shares:
    ``1 - sum_p share_p up_p (1 - s_p) / sum_p share_p up_p``.
    """
    result = estimate(cfg)
    if "gmfl" in result:
        gm = result["gmfl"]
        return gm["mean_uplink_saving_min"], gm["mean_uplink_saving_max"]
    profiles = result["profiles"].values()
    total = sum(p["clients_share"] * p["uplink"]["bytes"] for p in profiles)
    bounds = []
    for key in ("mean_uplink_saving_min", "mean_uplink_saving_max"):
        kept = sum(p["clients_share"] * p["uplink"]["bytes"] * (1 - p["gmfl"][key]) for p in profiles)
        bounds.append(1 - kept / total)
    return bounds[0], bounds[1]


def step_time_benchmark(overrides: Sequence[str], *, steps: int, repeats: int,
                        ratios: Sequence[float] = (0.0, 0.3, 0.55)) -> dict[str, Any]:
    """Median local step time of FedIT with and without GMFL masks, measured interleaved on one model.

    Variants: plain FedIT (no mask), GMFL at ratio 0 (mask sent, nothing frozen) and GMFL at the given
    ratios (the frozen tensors chosen as GMFL would from random magnitudes). Each repeat runs every
    variant for ``steps`` steps in turn; the first step of each block is dropped (optimizer state creation).
    """
    cfg = load_config(None, [*overrides, "train.local_update_steps", str(steps)])
    data = federated_data_for(cfg, load_tokenizer(cfg))
    model = build_backbone(cfg, data.num_labels).model
    initial = adapter_state(model)
    keys = list(adapter_parameters(model))
    candidates = mask_candidate_keys(keys, "fedit")
    magnitudes = dict(zip(candidates, torch.rand(len(candidates), generator=torch.Generator().manual_seed(0)).tolist()))
    variants: dict[str, tuple[ClientAlgorithm, Message]] = {"FedIT": (LoraClient("fedit"), Message(dict(initial)))}
    for ratio in ratios:
        frozen = select_frozen(magnitudes, ratio, tie_policy="exact_k")
        mask = pack_bits([k not in frozen for k in candidates])
        variants[f"GMFL ratio {ratio:g}"] = (gmfl_lora_client("fedit", candidates), Message(dict(initial), {"mask": mask}))
    client_data = data.client_data(0)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeats):
        for name, (client, message) in variants.items():
            plan = client.prepare(model, message.detached_copy(), {})
            stats = train_local(plan, client_data, cfg, rnd=rep + 1, client_id=0)
            times[name].extend(stats.step_seconds[1:])
    base = statistics.median(times["FedIT"])
    return {name: {"median_step_seconds": statistics.median(t), "relative_to_fedit": statistics.median(t) / base,
                   "steps": len(t)} for name, t in times.items()}


def summarise(results: dict[str, list[dict[str, Any]]], predicted: dict[str, tuple[float, float]]) -> list[list[Any]]:
    """Rows of the main table."""
    rows = []
    for name, summaries in results.items():
        ups = [s["comm"]["uplink_bytes"] for s in summaries]
        up = statistics.fmean(ups)
        row = [name, fmt_pm([s["final"]["test_acc"] for s in summaries]),
               fmt_pm([max(r.get("test_acc", 0.0) for r in s["per_round"]) for s in summaries]),
               f"{up / MIB:.2f}"]
        if name in BASE_OF and BASE_OF[name] in results:
            base_up = statistics.fmean(s["comm"]["uplink_bytes"] for s in results[BASE_OF[name]])
            lo, hi = predicted[name]
            row += [f"{(1 - up / base_up) * 100:.2f}%",
                    f"{lo * 100:.2f}%" if abs(hi - lo) < 1e-12 else f"{lo * 100:.2f}-{hi * 100:.2f}%",
                    f"{summaries[0]['per_round'][-1].get('frozen_fraction', 0.0):.2f}"]
        elif name in BASE_OF:  # run without its base method: no measured saving
            lo, hi = predicted[name]
            row += ["-", f"{lo * 100:.2f}%" if abs(hi - lo) < 1e-12 else f"{lo * 100:.2f}-{hi * 100:.2f}%",
                    f"{summaries[0]['per_round'][-1].get('frozen_fraction', 0.0):.2f}"]
        else:
            row += ["-", "-", "0.00"]
        row.append(f"{statistics.median(s['timing']['median_step_seconds'] for s in summaries) * 1000:.0f}")
        rows.append(row)
    return rows


def main(argv: Sequence[str]) -> int:
    """Run the GMFL benchmark; returns an exit code."""
    args = parse_args(argv)
    out = Path(args.out)
    common = common_overrides(args, out)
    seeds = args.seeds
    methods = [(name, extra) for name, extra in METHODS if name in args.methods]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in methods}
    for seed in seeds:
        for name, extra in methods:
            progress(f"[bench gmfl] seed {seed}: {name}")
            slug = name.lower().replace("+", "_").replace("-", "").replace("(", "_").replace(")", "")
            results[name].append(run_config([*common, *extra, "seed", str(seed), "expname", f"{slug}_s{seed}"],
                                            log=progress))
    predicted = {name: predicted_saving(load_config(None, [*common, *extra]))
                 for name, extra in methods if name in BASE_OF}
    timing = {}
    if args.timing_repeats > 0:
        progress("[bench gmfl] step-time micro-benchmark")
        timing = step_time_benchmark(common, steps=args.timing_steps, repeats=args.timing_repeats)
    header = ["method", "final test acc % (mean ± std)", "best test acc %", "uplink MiB (total)",
              "uplink saving (measured)", "saving predicted by schedule", "frozen fraction at end",
              "median step ms (runs)"]
    majority = majority_rates([load_config(None, [*common, "seed", str(seed)]) for seed in seeds])
    rows = summarise(results, predicted) + [[MAJORITY_LABEL, fmt_pm(majority), fmt_pm(majority), *["-"] * 5]]
    table = markdown_table(header, rows)
    timing_table = markdown_table(
        ["variant", "median step ms", "relative to FedIT", "steps timed"],
        [[n, f"{v['median_step_seconds'] * 1000:.1f}", f"{v['relative_to_fedit']:.3f}", v["steps"]]
         for n, v in timing.items()])
    plot = plot_runs([(name, mean_curve(s)) for name, s in results.items()], out / "gmfl_bench.png",
                     title=f"{args.model} on {args.dataset}, {args.clients} clients, {args.per_round}/round, "
                           f"Dir({args.alpha}), mean of {len(seeds)} seeds")
    write_json(out / "results.json", {"args": vars(args), "machine": machine(), "predicted_saving": predicted,
                                      "test_majority_rate": majority,
                                      "timing": timing, "runs": {n: [{k: s[k] for k in ("final", "comm", "timing",
                                                                                         "per_round")}
                                                                     for s in v] for n, v in results.items()}})
    text = f"{table}\n"
    if timing:
        text += f"\nLocal step time with and without masks (interleaved, one model):\n\n{timing_table}\n"
    (out / "table.md").write_text(text, encoding="utf-8")
    print(text)
    progress(f"[bench gmfl] wrote {out / 'results.json'}, {out / 'table.md'}, {plot}")
    return 0
