"""FedHFT benchmark (``fs-gmfl bench fedhft``): clustering, resource levels, bytes and client memory.

Pre-trained MiniLM (all-MiniLM-L6-v2, LoRA on query/value) on two real
multi-class datasets split strongly non-IID (Dirichlet alpha 0.1 over labels)
across 20 clients with resource levels ``[1.0, 0.5, 0.25]`` in equal shares:

* accuracy: FedHFT with K = 1, 2, 4 clusters against FedIT (FedAvg of LoRA),
  per seed; personalised accuracy (each client's model on its own validation
  shard, weighted by shard size) overall and per resource level, the global
  model's test accuracy, and the local-majority baseline (each client always
  predicts its training shard's most frequent class) for context;
* ``--methods local``: local-only training, the no-federation baseline (every
  client trains its own adapter from the initial one on its own shard, in the
  rounds the federated run of the same seed samples it, or with
  ``--local-only-rounds all`` in every round, ``--local-steps`` steps each,
  never aggregated, and is evaluated on its own validation shard; no global
  model, no bytes);
* bytes per round, measured from the messages of the runs (FedHFT, FedIT)
  and, for federated full fine-tuning, computed from the model's parameter
  count (labelled analytic: no ``fft`` method is registered on this branch);
* client memory and step time of one local round in a fresh subprocess each
  (LoRA at s = 1 and s = 0.25, with and without ``premask``, and full
  fine-tuning): peak resident set size during training minus the resident
  size just before it (Linux ``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``), plus the exact gradient + AdamW state bytes of
  the trained tensors.

Results go to ``<out>/results.jsonl`` (one line per run, so an interrupted
benchmark resumes with ``--resume``), ``<out>/summary.json``,
``<out>/fedhft_bench.md`` and ``<out>/fedhft_bench.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fs_gmfl.bench.common import MAJORITY_LABEL
from fs_gmfl.bench.options import BenchParser, non_negative, output_dir, positive, positive_real, run_seed
from fs_gmfl.config import RunConfig, load_config
from fs_gmfl.core.fedhft import assign_levels
from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.hosts.common.batches import sample_clients
from fs_gmfl.hosts.common.data import majority_class_rate

MIB = 2**20
LEVEL_SHARES = [1 / 3, 1 / 3, 1 / 3]
KEEP_RATIOS = [1.0, 0.5, 0.25]
DATASETS: dict[str, list[str]] = {
    "news_articles": ["data.type", "news_articles", "llm.tok_len", "32", "data.max_text_chars", "300"],
    "health_tweets": ["data.type", "health_tweets", "data.subsample", "0.06", "llm.tok_len", "32"],
}
PROBES = ("lora_s1", "lora_s0.25", "lora_s0.25_premask", "fft")
#: the local-only baseline's method name (no federation: see :func:`local_only_results`).
LOCAL_ONLY = "local"


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------
def base_overrides(args: argparse.Namespace, dataset: str, seed: int) -> list[str]:
    """Keys shared by every run of ``dataset`` and ``seed``."""
    return [
        *DATASETS[dataset], "model.type", "minilm", "seed", str(seed), "outdir", str(Path(args.out) / "runs"),
        "llm.adapter.args", f"[{{r: {args.rank}, lora_alpha: {2 * args.rank}}}]",
        "federate.client_num", str(args.clients), "federate.sample_client_num", str(args.clients_per_round),
        "federate.total_round_num", str(args.rounds), "data.splitter", "lda",
        "data.splitter_args", f"[{{alpha: {args.alpha}}}]", "data.client_val_fraction", "0.2",
        "train.local_update_steps", str(args.local_steps), "dataloader.batch_size", str(args.batch_size),
        "train.optimizer.lr", str(args.lr), "train.optimizer.weight_decay", "0.01", "eval.freq", str(args.rounds),
    ]


def method_overrides(method: str, args: argparse.Namespace) -> list[str]:
    """``fedit``, ``local`` (FedIT's client, never aggregated) or ``fedhft_k<K>``: the method's own keys."""
    if method in ("fedit", LOCAL_ONLY):
        return ["federate.method", "fedit"]
    k = int(method.split("_k")[1])
    return ["federate.method", "fedhft", "fedhft.num_clusters", str(k),
            "fedhft.levels", f"{{keep_ratio: {KEEP_RATIOS}, client_share: {LEVEL_SHARES}}}",
            "fedhft.cluster_warmup_rounds", str(args.warmup), "fedhft.cluster_features", "head_pca",
            "fedhft.cluster_pca_dim", str(args.pca_dim), "fedhft.norm", "soft"]


def run_config(args: argparse.Namespace, dataset: str, seed: int, method: str) -> RunConfig:
    """The configuration of one benchmark run."""
    return load_config(None, [*base_overrides(args, dataset, seed), *method_overrides(method, args),
                              "expname", f"{dataset}_{method}_s{seed}"])


# ---------------------------------------------------------------------------------------------
# one accuracy/bytes run
# ---------------------------------------------------------------------------------------------
def client_levels(cfg: RunConfig) -> list[int]:
    """The resource level of every client (the assignment FedHFT's strategy makes for this seed)."""
    return assign_levels(cfg.federate.client_num, LEVEL_SHARES, seed=derive_seed(cfg.seed, "levels"))


def personalised_results(sim: Any, metrics: dict[str, float]) -> dict[int, tuple[int, float]]:
    """``client -> (val size, accuracy)``: FedHFT's ``client:<id>`` models, or the global model for FedIT."""
    from fs_gmfl.hosts.sim.runner import temporarily_loaded
    from fs_gmfl.hosts.sim.training import evaluate

    out: dict[int, tuple[int, float]] = {}
    for cid in range(sim.cfg.federate.client_num):
        data = sim.data.client_val_data(cid)
        if not len(data):
            continue
        key = f"client:{cid}/val_acc"
        if key not in metrics:
            with temporarily_loaded(sim.model, sim.method.strategy.global_adapter()):
                metrics[key] = evaluate(sim.model, data, batch_size=sim.cfg.eval.batch_size, task="seq_cls")["acc"]
        out[cid] = (len(data), metrics[key])
    return out


def weighted_accuracy(results: dict[int, tuple[int, float]], clients: Sequence[int]) -> float:
    """Sample-weighted accuracy over ``clients``."""
    chosen = [results[c] for c in clients if c in results]
    total = sum(n for n, _ in chosen)
    return sum(n * a for n, a in chosen) / total if total else float("nan")


def checkpoint(sim: Any, rnd: int) -> dict[str, float]:
    """Personalised and global test accuracy after round ``rnd`` (``--trace-every``; evaluation only)."""
    metrics = sim.evaluate_global()
    per_client = personalised_results(sim, metrics)
    return {"round": rnd, "personalised_acc": weighted_accuracy(per_client, list(per_client)),
            "global_test_acc": metrics["test_acc"]}


def majority_baseline(sim: Any) -> float:
    """Accuracy of predicting each client's most frequent training label on its validation shard."""
    hits = total = 0
    for cid in range(sim.cfg.federate.client_num):
        train, val = sim.data.client_data(cid), sim.data.client_val_data(cid)
        if len(val):
            majority = int(torch.bincount(train.labels).argmax())
            hits += int((val.labels == majority).sum())
            total += len(val)
    return hits / total


def bytes_by_level(sim: Any, levels: Sequence[int]) -> dict[str, float]:
    """Mean uplink and downlink bytes per client-round, per resource level."""
    out: dict[str, float] = {}
    for direction in ("uplink", "downlink"):
        for level in range(len(KEEP_RATIOS)):
            sizes = [t.nbytes for t in sim.ledger.transfers if t.direction == direction and levels[t.client_id] == level
                     and (direction == "uplink" or t.round > 1)]
            out[f"{direction}_bytes_level{level}"] = statistics.fmean(sizes) if sizes else float("nan")
    return out


def local_rounds(cfg: RunConfig, client_id: int, schedule: str) -> list[int]:
    """The rounds a local-only client trains in: all of them, or those the federated run samples it in.

    ``sampled`` gives every client the compute and batches it has in a
    federated run of the same seed (the same client draw); ``all`` gives
    every client ``total_round_num`` rounds.
    """
    rounds = range(1, cfg.federate.total_round_num + 1)
    if schedule == "all":
        return list(rounds)
    per_round = cfg.federate.clients_per_round()
    return [r for r in rounds
            if client_id in sample_clients(cfg.federate.client_num, per_round, seed=cfg.seed, rnd=r)]


def train_local_only(sim: Any, client_id: int, rounds: Sequence[int]) -> dict[str, torch.Tensor]:
    """Client ``client_id``'s adapter after local training on its own shard in ``rounds``.

    It starts from the initial global adapter and continues from its own
    result every round (FedIT's client and local loop, with the round's
    batch draw), never seeing another client's update.
    """
    from fs_gmfl.core.message import Message
    from fs_gmfl.hosts.sim.training import train_local

    tensors = sim.method.strategy.global_adapter()
    data = sim.data.client_data(client_id)
    for rnd in rounds:
        plan = sim.method.client.prepare(sim.model, Message(tensors), {})
        stats = train_local(plan, data, sim.cfg, rnd=rnd, client_id=client_id, device=sim.device)
        sim.step_seconds.extend(stats.step_seconds)
        tensors = {**tensors, **sim.method.client.finish(plan, stats, {}).tensors}
    return tensors


def local_only_results(sim: Any, schedule: str = "sampled") -> dict[int, tuple[int, float]]:
    """``client -> (val size, accuracy)`` of every client's local-only adapter on its own validation shard.

    ``schedule`` is :func:`local_rounds`'s (``--local-only-rounds``).
    """
    from fs_gmfl.hosts.sim.runner import temporarily_loaded
    from fs_gmfl.hosts.sim.training import evaluate

    out: dict[int, tuple[int, float]] = {}
    for cid in range(sim.cfg.federate.client_num):
        data = sim.data.client_val_data(cid)
        if not len(data):
            continue
        adapter = train_local_only(sim, cid, local_rounds(sim.cfg, cid, schedule))
        with temporarily_loaded(sim.model, adapter):
            out[cid] = (len(data), evaluate(sim.model, data, batch_size=sim.cfg.eval.batch_size,
                                            task="seq_cls", device=sim.device)["acc"])
    return out


def common_fields(sim: Any) -> dict[str, Any]:
    """Record fields every method has: the reference lines, step time and the model size."""
    return {"majority_baseline": majority_baseline(sim),
            "test_majority_rate": majority_class_rate(sim.data.test.labels),
            "median_step_seconds": statistics.median(sim.step_seconds) if sim.step_seconds else float("nan"),
            "full_model_params": sum(p.numel() for n, p in sim.model.named_parameters()
                                     if "lora_" not in n and ".original_module." not in n)}


def run_local_only(sim: Any, levels: Sequence[int], schedule: str) -> dict[str, Any]:
    """The record fields of the local-only baseline: personalised accuracy only (no global model, no bytes)."""
    per_client = local_only_results(sim, schedule)
    nan = float("nan")
    return {
        "rounds": sim.cfg.federate.total_round_num,
        "personalised_acc": weighted_accuracy(per_client, list(per_client)),
        **{f"personalised_acc_level{lv}": weighted_accuracy(per_client, [c for c in per_client if levels[c] == lv])
           for lv in range(len(KEEP_RATIOS))},
        "global_test_acc": nan, "uplink_bytes_per_round": 0.0, "downlink_bytes_per_round": 0.0,
        **{f"{d}_bytes_level{lv}": 0.0 for d in ("uplink", "downlink") for lv in range(len(KEEP_RATIOS))},
        "clustering_rounds": 0, "membership_max_mean": 1.0, "trace": [], "local_only_rounds": schedule,
        "local_steps_per_client": statistics.fmean(
            len(local_rounds(sim.cfg, c, schedule)) for c in range(sim.cfg.federate.client_num))
        * sim.cfg.train.local_update_steps,
    }


def run_once(args: argparse.Namespace, dataset: str, seed: int, method: str) -> dict[str, Any]:
    """Train ``method`` on ``dataset`` with ``seed``; evaluate once at the end; return the record."""
    from fs_gmfl.hosts.sim.runner import Simulation

    cfg = run_config(args, dataset, seed, method)
    start = time.time()
    sim = Simulation(cfg, quiet=True)
    sim.setup()
    if method == LOCAL_ONLY:
        record = {"dataset": dataset, "seed": seed, "method": method, **run_local_only(sim, client_levels(cfg), args.local_only_rounds),
                  **common_fields(sim)}
        record["wall_seconds"] = time.time() - start
        return record
    rows, trace = [], []
    for rnd in range(1, cfg.federate.total_round_num + 1):
        rows.append(sim.run_round(rnd))
        if args.trace_every and rnd % args.trace_every == 0 and rnd < cfg.federate.total_round_num:
            trace.append(checkpoint(sim, rnd))
    metrics = sim.evaluate_global()
    levels = client_levels(cfg)
    per_client = personalised_results(sim, metrics)
    record = {
        "dataset": dataset, "seed": seed, "method": method, "rounds": len(rows),
        "personalised_acc": weighted_accuracy(per_client, list(per_client)),
        **{f"personalised_acc_level{lv}": weighted_accuracy(per_client, [c for c in per_client if levels[c] == lv])
           for lv in range(len(KEEP_RATIOS))},
        "global_test_acc": metrics["test_acc"], **common_fields(sim),
        "uplink_bytes_per_round": statistics.fmean(r["uplink_bytes"] for r in rows),
        "downlink_bytes_per_round": statistics.fmean(r["downlink_bytes"] for r in rows[1:] or rows),
        **bytes_by_level(sim, levels),
        "clustering_rounds": sum(1 for r in rows if r.get("clustering_skipped") == 0.0),
        "membership_max_mean": rows[-1].get("membership_max_mean", 1.0),
        "wall_seconds": time.time() - start,
        "trace": trace,
    }
    del sim
    gc.collect()
    return record


# ---------------------------------------------------------------------------------------------
# client memory / step time probes (one subprocess each)
# ---------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def probe(kind: str, steps: int, batch_size: int) -> dict[str, Any]:
    """Train one client for ``steps`` steps in this process and measure its memory and step time."""
    from fs_gmfl.core.adapter import adapter_state
    from fs_gmfl.core.fedhft import FedHFTClient, downlink_message
    from fs_gmfl.core.protocol import LocalPlan
    from fs_gmfl.hosts.common.data import build_federated_data
    from fs_gmfl.hosts.common.models import build_backbone, load_tokenizer, minilm_path, set_threads_from_env
    from fs_gmfl.hosts.sim.training import train_local

    set_threads_from_env()
    cfg = load_config(None, ["model.type", "minilm", "data.type", "news_articles", "data.subsample", "0.1",
                             "llm.tok_len", "128", "federate.client_num", "1", "federate.method", "fedhft",
                             "fedhft.eval", "global", "dataloader.batch_size", str(batch_size),
                             "train.local_update_steps", str(steps), "llm.adapter.args", "[{r: 8, lora_alpha: 16}]",
                             "train.optimizer.weight_decay", "0.01"])
    data = build_federated_data(cfg.data, num_clients=1, tokenizer=load_tokenizer(cfg), max_length=128, seed=0)
    if kind == "fft":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=data.num_labels)
        plan = LocalPlan(model=model, trainable=dict(model.named_parameters()))
    else:
        model = build_backbone(cfg, data.num_labels).model
        keep = 1.0 if kind == "lora_s1" else 0.25
        g = torch.Generator().manual_seed(0)
        state = adapter_state(model)
        factors = {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in state.items() if ".lora_" in k}
        heads = {k: v for k, v in state.items() if ".modules_to_save." in k}
        client = FedHFTClient([keep], premask=kind.endswith("premask"))
        plan = client.prepare(model, downlink_message(heads, factors, level=0, seed=1), {})
    trainable = sum(p.numel() for p in plan.trainable.values())
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    stats = train_local(plan, data.client_data(0), cfg, rnd=1, client_id=0)
    peak = _status_kib("VmHWM")
    return {"probe": kind, "steps": stats.steps, "batch_size": batch_size, "seq_len": 128,
            "trainable_params": trainable, "grad_and_adamw_state_bytes": trainable * 4 * 3,
            "peak_rss_increase_mib": (peak - before) / 1024, "rss_before_mib": before / 1024,
            "peak_rss_mib": peak / 1024,
            "median_step_seconds": statistics.median(stats.step_seconds[1:] or stats.step_seconds)}


def run_probes(args: argparse.Namespace, path: Path) -> list[dict[str, Any]]:
    """Every probe in its own interpreter, so allocator reuse cannot hide a probe's peak; saved to ``path``."""
    if args.resume and path.exists():
        return json.loads(path.read_text())
    out = []
    for kind in PROBES:
        cmd = [sys.executable, "-m", "fs_gmfl.bench.fedhft", "--probe", kind, "--probe-steps", str(args.probe_steps),
               "--probe-batch", str(args.probe_batch)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"probe {kind} failed: {result.stderr[-2000:]}")
        out.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"  probe {kind}: {out[-1]}", file=sys.stderr)
    path.write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# aggregation, report, plot
# ---------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``dataset -> method -> metric -> [mean, std, n]`` over seeds."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for rec in records:
        out.setdefault(rec["dataset"], {}).setdefault(rec["method"], {})
    for dataset, methods in out.items():
        for method in methods:
            recs = [r for r in records if r["dataset"] == dataset and r["method"] == method]
            keys = [k for k, v in recs[0].items() if isinstance(v, (int, float)) and k != "seed"]
            methods[method] = {k: [*mean_std([r[k] for r in recs]), len(recs)] for k in keys}
    return out


def fmt(stat: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± std`` text; ``-`` where there is no value (the local-only baseline's global accuracy)."""
    if stat[0] != stat[0]:
        return "-"
    return f"{stat[0] * scale:.{digits}f} ± {stat[1] * scale:.{digits}f}"


def markdown(summary: dict[str, Any], probes: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The benchmark's tables."""
    lines = [f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s); "
             f"{args.clients} clients, {args.clients_per_round} per round, {args.rounds} rounds, "
             f"{args.local_steps} local steps of batch {args.batch_size}, LoRA r={args.rank}, lr {args.lr}, "
             f"Dirichlet alpha {args.alpha}, levels {KEEP_RATIOS} in equal shares; mean ± std over seeds "
             f"{args.seeds}.", ""]
    for dataset, methods in summary.items():
        lines += [f"### {dataset}", "", "| method | personalised acc | s=1.0 | s=0.5 | s=0.25 | global test acc | "
                  "majority baseline | uplink MiB/round | downlink MiB/round |", "|---|---|---|---|---|---|---|---|---|"]
        for method, m in methods.items():
            lines.append(f"| {method} | {fmt(m['personalised_acc'])} | {fmt(m['personalised_acc_level0'])} | "
                         f"{fmt(m['personalised_acc_level1'])} | {fmt(m['personalised_acc_level2'])} | "
                         f"{fmt(m['global_test_acc'])} | {m['majority_baseline'][0]:.3f} | "
                         f"{m['uplink_bytes_per_round'][0] / MIB:.3f} | {m['downlink_bytes_per_round'][0] / MIB:.3f} |")
        lines += majority_row(methods)
        lines += ["", bytes_table(methods, args), ""]
    if probes:
        lines += probe_table(probes)
    return "\n".join(lines) + "\n"


def majority_row(methods: dict[str, Any]) -> list[str]:
    """The reference row: the majority-class rate of the server's test split, beside the global test accuracy.

    Empty for records written before the rate was recorded (``--resume`` of an older benchmark).
    """
    rates = next(iter(methods.values())).get("test_majority_rate")
    if rates is None:
        return []
    return [f"| {MAJORITY_LABEL} | - | - | - | - | {fmt(rates)} | - | - | - |"]


def bytes_table(methods: dict[str, Any], args: argparse.Namespace) -> str:
    """Per-client bytes per round by level, with full fine-tuning's (analytic) for comparison."""
    any_method = next(iter(methods.values()))
    fft = any_method["full_model_params"][0] * 4
    rows = ["| per client and round | uplink KiB | downlink KiB | uplink vs FFT |", "|---|---|---|---|",
            f"| full fine-tuning (analytic: 4 B x {int(any_method['full_model_params'][0]):,} params) | "
            f"{fft / 1024:,.0f} | {fft / 1024:,.0f} | 1x |"]
    for method, m in methods.items():
        if method == LOCAL_ONLY:  # sends nothing
            continue
        for level, ratio in enumerate(KEEP_RATIOS):
            up, down = m[f"uplink_bytes_level{level}"][0], m[f"downlink_bytes_level{level}"][0]
            label = f"{method}, s={ratio}" if method != "fedit" else f"fedit (clients of level {level})"
            rows.append(f"| {label} | {up / 1024:,.1f} | {down / 1024:,.1f} | {fft / up:,.0f}x smaller |")
    return "\n".join(rows)


def probe_table(probes: list[dict[str, Any]]) -> list[str]:
    """Client memory and step time, side by side."""
    lines = ["### Client memory and step time (one local round, MiniLM, news, batch "
             f"{probes[0]['batch_size']}, seq 128)", "",
             "| client | trainable params | grad + AdamW state MiB | RSS before training MiB | peak RSS MiB | "
             "peak increase MiB | median step s |", "|---|---|---|---|---|---|---|"]
    for p in probes:
        lines.append(f"| {p['probe']} | {p['trainable_params']:,} | {p['grad_and_adamw_state_bytes'] / MIB:.2f} | "
                     f"{p['rss_before_mib']:.0f} | {p['peak_rss_mib']:.0f} | {p['peak_rss_increase_mib']:.0f} | "
                     f"{p['median_step_seconds']:.3f} |")
    return lines + [""]


def plot(summary: dict[str, Any], clients_per_round: int, path: Path) -> None:
    """Personalised accuracy per method and level, and bytes per round (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary)
    fig, axes = plt.subplots(1, len(datasets) + 1, figsize=(5 * (len(datasets) + 1), 4))
    for ax, dataset in zip(axes, datasets):
        methods = list(summary[dataset])
        keys = ["personalised_acc", "personalised_acc_level0", "personalised_acc_level1", "personalised_acc_level2"]
        labels = ["all", "s=1.0", "s=0.5", "s=0.25"]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            m = summary[dataset][method]
            ax.bar([x + i * width for x in range(len(keys))], [m[k][0] for k in keys], width,
                   yerr=[m[k][1] for k in keys], label=method, capsize=2)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], labels)
        ax.set_ylabel("personalised accuracy")
        ax.set_title(dataset)
        ax.legend(fontsize=7)
    ax = axes[-1]
    methods = {m: v for m, v in summary[datasets[0]].items() if m != LOCAL_ONLY}
    names = ["FFT (analytic)"] + [f"{m}" for m in methods]
    fft = next(iter(methods.values()))["full_model_params"][0] * 4 * clients_per_round
    values = [fft] + [methods[m]["uplink_bytes_per_round"][0] for m in methods]
    ax.bar(names, [v / MIB for v in values])
    ax.set_yscale("log")
    ax.set_ylabel(f"uplink MiB per round ({datasets[0]})")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options of ``fs-gmfl bench fedhft``."""
    p = BenchParser("fedhft", __doc__, quick=QUICK, quick_help="smoke test: news, seed 0, K 1/2, 3 rounds, 2 steps")
    p.add_argument("--out", type=output_dir, default="bench_out/fedhft", help="output directory")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--methods", nargs="+", type=method_name, default=["fedit", "fedhft_k1", "fedhft_k2", "fedhft_k4"],
                   help="fedit, fedhft_k<K> (FedHFT with K clusters) and/or local (local-only training, "
                        "no federation)")
    p.add_argument("--seeds", nargs="+", type=run_seed, default=[0, 1, 2])
    p.add_argument("--local-only-rounds", choices=["sampled", "all"], default="sampled",
                   help="local-only baseline: train each client in the rounds the federated run samples it "
                        "(same compute and batches as there) or in every round")
    p.add_argument("--rounds", type=positive, default=6)
    p.add_argument("--clients", type=positive, default=20)
    p.add_argument("--clients-per-round", type=positive, default=8)
    p.add_argument("--local-steps", type=positive, default=8)
    p.add_argument("--batch-size", type=positive, default=8)
    p.add_argument("--rank", type=positive, default=8)
    p.add_argument("--lr", type=positive_real, default=3e-3)
    p.add_argument("--alpha", type=positive_real, default=0.1, help="Dirichlet concentration of the label split")
    p.add_argument("--warmup", type=non_negative, default=1, help="fedhft.cluster_warmup_rounds")
    p.add_argument("--pca-dim", type=positive, default=4, help="fedhft.cluster_pca_dim (head_pca features)")
    p.add_argument("--probe-steps", type=positive, default=8)
    p.add_argument("--probe-batch", type=positive, default=16)
    p.add_argument("--no-probes", action="store_true", help="skip the memory/step-time probes")
    p.add_argument("--trace-every", type=non_negative, default=0,
                   help="also record personalised and global test accuracy every N rounds (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in results.jsonl")
    p.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)
    return p.parse_args(list(argv))


#: what ``--quick`` sets (options given explicitly keep their values).
QUICK = {"datasets": ["news_articles"], "seeds": [0], "rounds": "3", "local_steps": "2",
         "methods": ["fedit", "fedhft_k1", "fedhft_k2"], "clients_per_round": "6", "warmup": "1", "probe_steps": "3"}


def method_name(text: str) -> str:
    """``fedit``, ``local`` or ``fedhft_k<K>``: FedHFT with K clusters, 1 to 1000."""
    clusters = text.removeprefix("fedhft_k")
    if text not in ("fedit", LOCAL_ONLY) and not (clusters != text and clusters.isascii() and clusters.isdigit()
                                and 1 <= int(clusters) <= 1000):
        raise argparse.ArgumentTypeError(f"{text!r} is not fedit, local or fedhft_k<K> with K from 1 to 1000 "
                                         "(e.g. fedhft_k2)")
    return text


def main(argv: Sequence[str]) -> int:
    """Run the benchmark (or one probe, internally); write results, table and plot."""
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, args.probe_steps, args.probe_batch)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    records = [json.loads(x) for x in results.read_text().splitlines()] if args.resume and results.exists() else []
    if not args.resume:
        results.write_text("")
    done = {(r["dataset"], r["seed"], r["method"]) for r in records}
    for dataset in args.datasets:
        for seed in args.seeds:
            for method in args.methods:
                if (dataset, seed, method) in done:
                    continue
                record = run_once(args, dataset, seed, method)
                records.append(record)
                with open(results, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
                print(f"{dataset} seed {seed} {method}: personalised {record['personalised_acc']:.3f}, global "
                      f"{record['global_test_acc']:.3f}, {record['wall_seconds']:.0f}s", file=sys.stderr)
    probes = [] if args.no_probes else run_probes(args, out / "probes.json")
    summary = summarise(records)
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "summary": summary, "probes": probes},
                                                 indent=2), encoding="utf-8")
    (out / "fedhft_bench.md").write_text(markdown(summary, probes, args), encoding="utf-8")
    plot(summary, args.clients_per_round, out / "fedhft_bench.png")
    print((out / "fedhft_bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
