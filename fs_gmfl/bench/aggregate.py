"""``fs-gmfl bench aggregate``: server memory and time of one round's aggregation against the number of uplinks.

Issue 16 item 4 (streaming aggregation). Each measurement runs in a fresh
child process: it builds a strategy over a synthetic LLaMA-7B-shaped adapter
(``--layers`` layers x ``q_proj``, ``v_proj``, hidden ``--hidden``, LoRA rank
``--rank``, fp32: 33.5 MB of uplink per client with the defaults), then
aggregates ``N`` uplinks made on the fly, one per sampled client, and
reports the process's resident set size just before the aggregation, its
peak during the aggregation (``VmHWM`` after resetting it through
``/proc/self/clear_refs``; the process's lifetime peak ``ru_maxrss`` is kept
in ``results.json`` too) and the aggregation's seconds (making the uplinks
excluded, timed apart): wall-clock and the process's CPU time (user + system,
``time.process_time``), which a busy machine inflates far less.

Two ways of feeding the same replies:

* **streamed**: a generator makes each uplink when the strategy asks for the
  next one, as the simulator now does (only one is alive at a time);
* **listed**: every uplink is made first and the list handed over (what a
  host that buffers the round does, as both hosts did before): memory grows
  by one uplink per client. Measured only for small ``N``.

Methods: ``fedit`` (FedAvg of every LoRA factor) and ``hafl`` (HAFL's
default options, every client training all ``r`` components, so its
uplink is the full adapter too). Writes ``results.json`` and ``table.md``
to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fs_gmfl.bench.common import machine, markdown_table, progress, write_json
from fs_gmfl.bench.options import (BenchParser, assignments, count, int_list, output_dir, positive,
                                   subset)
from fs_gmfl.core.message import Message, Reply, samples_tensor
from fs_gmfl.core.protocol import Strategy

MIB = 2**20


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Benchmark options."""
    p = BenchParser("aggregate", __doc__, quick=QUICK, quick_help="smoke version: 2 layers, hidden 64, N = 4, 8; "
                    "1 repeat")
    p.add_argument("--clients", type=CLIENT_COUNTS, default="10,100,1000",
                   help=f"comma-separated numbers of uplinks N (streamed), each 1 to {MAX_CLIENTS}")
    p.add_argument("--listed-clients", type=LISTED_COUNTS, default="10,100",
                   help="N for the listed (non-streaming) contrast; '' for none")
    p.add_argument("--methods", type=subset(METHODS), default="fedit,hafl",
                   help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--max-clients", type=assignments(METHODS, count(MAX_CLIENTS), form="METHOD=N"),
                   default="", help="per method, the largest N run (method=N,...)")
    p.add_argument("--layers", type=positive, default=32)
    p.add_argument("--hidden", type=positive, default=4096)
    p.add_argument("--rank", type=positive, default=16)
    p.add_argument("--repeats", type=positive, default=3,
                   help="fresh processes per (method, N, feed); medians reported")
    p.add_argument("--repeats-large", type=positive, default=1, help="repeats for N >= 1000 (one run takes minutes)")
    p.add_argument("--out", type=output_dir, default="bench_out/aggregate")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args(list(argv))


#: methods this benchmark can build over the synthetic adapter.
METHODS = ("fedit", "hafl")
MAX_CLIENTS = 1_000_000
CLIENT_COUNTS = int_list(count(MAX_CLIENTS), what="number of uplinks")
LISTED_COUNTS = int_list(count(MAX_CLIENTS), what="number of uplinks", allow_empty=True)
QUICK = {"layers": "2", "hidden": "64", "rank": "4", "repeats": "1", "repeats_large": "1", "clients": "4,8",
         "listed_clients": "4"}


# -- the synthetic adapter and its uplinks --------------------------------------------------------------------
def adapter_keys(layers: int) -> list[tuple[str, str]]:
    """``(lora_A key, lora_B key)`` of ``q_proj`` and ``v_proj`` in every layer (peft's names for LLaMA)."""
    prefix = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.default.weight"
    return [(prefix.format(i, m, "A"), prefix.format(i, m, "B")) for i in range(layers) for m in ("q_proj", "v_proj")]


def initial_adapter(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """LoRA's initialisation: ``A`` random (kaiming-sized), ``B`` zero."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for a_key, b_key in adapter_keys(args.layers):
        out[a_key] = torch.randn(args.rank, args.hidden, generator=g) / args.hidden ** 0.5
        out[b_key] = torch.zeros(args.hidden, args.rank)
    return out


def uplink_bytes(args: argparse.Namespace) -> int:
    return 2 * args.layers * 2 * args.rank * args.hidden * 4


def build_strategy(method: str, initial: dict[str, torch.Tensor], clients: int, rank: int) -> Strategy:
    if method == "fedit":
        from fs_gmfl.core.fedavg import LoraFedAvg

        return LoraFedAvg(initial)
    if method == "hafl":
        from fs_gmfl.config.fields import make
        from fs_gmfl.core.hafl import HAFLConfig, HAFLStrategy

        return HAFLStrategy(initial, make(HAFLConfig, "hafl."), trained=[rank] * clients, lr=1e-4)
    raise SystemExit(f"unknown method {method!r}; expected fedit or hafl")


def open_round(method: str, strategy: Any, clients: int) -> None:
    """Open round 1 for clients ``0..clients-1`` as ``configure_round`` does, without building their downlinks.

    ``configure_round`` returns every downlink at once: with stateless FedIT
    that is one full adapter copy per client (N x 33.5 MB here, 33.5 GB for
    N = 1,000), which is not what this benchmark measures.
    """
    ids = list(range(clients))
    strategy.gate.open(1, ids)
    if method == "hafl":  # HAFL's round state: each client's assigned components (round 1: the first n_k)
        selected = strategy.selection(strategy.rank)
        strategy.pending = {c: selected for c in ids}


class UplinkMaker:
    """Makes client ``c``'s uplink: the global adapter moved by a small client-specific step (fresh tensors).

    Timed separately (``seconds`` wall-clock, ``cpu_seconds`` CPU) so that the aggregation's time excludes it.
    """

    def __init__(self, method: str, strategy: Strategy, initial: dict[str, torch.Tensor]) -> None:
        g = torch.Generator().manual_seed(1)
        self.method, self.strategy = method, strategy
        self.initial = initial
        self.step = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in initial.items()}
        self.seconds = self.cpu_seconds = 0.0

    def __call__(self, cid: int) -> Reply:
        start, cpu_start = time.perf_counter(), time.process_time()
        scale = 1.0 + (cid % 7) / 7
        tensors = {k: v + self.step[k] * scale for k, v in self.initial.items()}
        samples = 100 + cid % 13
        if self.method == "hafl":
            from fs_gmfl.core.hafl import build_uplink

            s = self.strategy
            message = build_uplink(tensors, s.pairs, s.pending[cid], rank=s.rank, num_samples=samples,
                                   truncated=s.config.scheme == "truncation")
        else:
            message = Message(tensors, {"num_samples": samples_tensor(samples)})
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu_start
        return Reply(cid, message)


def streamed(make: UplinkMaker, clients: int) -> Iterator[Reply]:
    for cid in range(clients):
        yield make(cid)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement (``--child method,N,feed``) in this fresh process."""
    method, clients, feed = args.child.split(",")
    n = int(clients)
    torch.set_num_threads(1)
    initial = initial_adapter(args)
    strategy = build_strategy(method, initial, n, args.rank)
    open_round(method, strategy, n)
    make = UplinkMaker(method, strategy, initial)
    gc.collect()
    reset_peak_rss()
    rss_before = proc_status_bytes("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    replies = [make(c) for c in range(n)] if feed == "listed" else streamed(make, n)
    report = strategy.aggregate(1, replies)
    total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
    peak = proc_status_bytes("VmHWM")
    if len(report.accepted) != n:
        raise SystemExit(f"only {len(report.accepted)} of {n} uplinks accepted: {report.rejected}")
    seconds, cpu_seconds = total - make.seconds, cpu_total - make.cpu_seconds
    return {"method": method, "clients": n, "feed": feed, "peak_rss_bytes": peak, "rss_before_bytes": rss_before,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "aggregate_s": seconds, "per_uplink_ms": seconds / n * 1000, "make_uplinks_s": make.seconds,
            "aggregate_cpu_s": cpu_seconds, "per_uplink_cpu_ms": cpu_seconds / n * 1000}


def reset_peak_rss() -> None:
    """Reset the peak RSS (``VmHWM``) to the current RSS (Linux >= 4.0): the next peak is the aggregation's."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``: resident now; ``VmHWM``: peak since the reset), in bytes."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_child(args: argparse.Namespace, method: str, clients: int, feed: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fs_gmfl", "bench", "aggregate", "--layers", str(args.layers), "--hidden",
           str(args.hidden), "--rank", str(args.rank), "--child", f"{method},{clients},{feed}"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"child {method} N={clients} {feed} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- driver and report --------------------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """Every (method, N, feed) to measure, small N first."""
    out = []
    for method in args.methods:
        limit = args.max_clients.get(method, MAX_CLIENTS)
        out += [(method, n, "streamed") for n in args.clients if n <= limit]
        out += [(method, n, "listed") for n in args.listed_clients if n <= limit]
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = {key: statistics.median(r[key] for r in runs)
           for key in ("peak_rss_bytes", "rss_before_bytes", "aggregate_s", "per_uplink_ms", "aggregate_cpu_s",
                       "per_uplink_cpu_ms")}
    med["aggregation_rss_bytes"] = statistics.median(r["peak_rss_bytes"] - r["rss_before_bytes"] for r in runs)
    return {**med, "repeats": len(runs)}


def table(results: dict[str, Any]) -> str:
    rows = []
    for item in results["measurements"]:
        s = item["median"]
        rows.append([item["method"], item["feed"], item["clients"], f"{s['peak_rss_bytes'] / MIB:.0f}",
                     f"{s['aggregation_rss_bytes'] / MIB:.0f}", f"{s['aggregate_s']:.2f}", f"{s['per_uplink_ms']:.0f}",
                     f"{s['aggregate_cpu_s']:.2f}", f"{s['per_uplink_cpu_ms']:.0f}", s["repeats"]])
    header = ["method", "feed", "N", "peak RSS MiB", "growth in aggregate MiB", "aggregate s", "ms / uplink",
              "aggregate CPU s", "CPU ms / uplink", "runs"]
    mb = results["uplink_bytes"] / 1e6
    return (f"{results['layers']} layers x q_proj, v_proj, hidden {results['hidden']}, LoRA r={results['rank']}, "
            f"fp32: {mb:.1f} MB per uplink\n\n" + markdown_table(header, rows))


def main(argv: Sequence[str]) -> int:
    """Run every measurement in its own process and write the results."""
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "layers": args.layers,
                               "hidden": args.hidden, "rank": args.rank, "uplink_bytes": uplink_bytes(args),
                               "measurements": []}
    for method, clients, feed in plan(args):
        repeats = args.repeats_large if clients >= 1000 else args.repeats
        runs = []
        for rep in range(repeats):
            progress(f"aggregate: {method} N={clients} {feed} ({rep + 1}/{repeats})")
            runs.append(run_child(args, method, clients, feed))
        results["measurements"].append({"method": method, "clients": clients, "feed": feed, "runs": runs,
                                        "median": summarise(runs)})
        write_json(out / "results.json", results)
    (out / "table.md").write_text(table(results) + "\n", encoding="utf-8")
    print(table(results))
    return 0
