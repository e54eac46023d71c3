"""Helpers shared by the benchmarks: running configurations, statistics, tables, machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fs_gmfl.config import RunConfig, load_config
from fs_gmfl.errors import FsGmflError, InputError
from fs_gmfl.hosts.common.data import majority_rate_of_test_split
from fs_gmfl.hosts.sim.checkpoint import flat_config
from fs_gmfl.hosts.sim.runner import Simulation
from fs_gmfl.hosts.sim.training import autocast_context
from fs_gmfl.plots import MIB


def machine() -> dict[str, Any]:
    """Facts about the machine a benchmark ran on."""
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_pm(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` of ``values * scale``."""
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def run_config(overrides: Sequence[str], *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one simulator configuration quietly and return its summary."""
    cfg = load_config(None, list(overrides))
    start = time.time()
    summary = Simulation(cfg, quiet=True, overwrite=True).run()  # a benchmark re-run replaces its runs
    final = summary["final"]
    log(f"  {cfg.run_name}: {time.time() - start:.0f}s, test_acc {final.get('test_acc', float('nan')):.4f}, "
        f"uplink {summary['comm']['uplink_bytes'] / MIB:.2f} MiB")
    return summary


def earlier_summary(cfg: RunConfig, *, fresh: bool) -> dict[str, Any] | None:
    """The summary a finished earlier run of exactly ``cfg`` left in its run directory; ``None``: run it.

    A benchmark reuses its finished runs unless ``fresh``. A run directory of the
    same name holding a finished run of another configuration (another benchmark,
    other options, an older version) is refused rather than read as this one or
    replaced.

    Raises:
        InputError: the run directory holds a finished run of another configuration.
    """
    run_dir = Path(cfg.outdir) / cfg.run_name
    if fresh or not (run_dir / "summary.json").is_file():
        return None
    difference = configuration_difference(cfg, run_dir / "config.yaml")
    if difference:
        raise InputError(f"{run_dir} holds a finished run of another configuration ({difference}); rerun with "
                         "--fresh to replace the earlier runs, or choose another --out")
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


#: sections the embedded simulator never reads (another host's settings): a change there leaves a benchmark run valid.
OTHER_HOSTS_SECTIONS = ("flower.",)


def configuration_difference(cfg: RunConfig, saved: Path) -> str:
    """The first key whose value differs between ``cfg`` and the ``config.yaml`` at ``saved``; '' when none.

    Keys of :data:`OTHER_HOSTS_SECTIONS` are not compared: benchmarks run the
    embedded simulator, and e.g. a changed ``flower.*`` default does not change
    what an earlier run computed.
    """
    try:
        earlier = flat_config(load_config(saved))
    except FsGmflError:
        return f"{saved.name} is missing or no longer loads"
    now = flat_config(cfg)
    for key in sorted(set(earlier) | set(now)):
        if key.startswith(OTHER_HOSTS_SECTIONS):
            continue
        if earlier.get(key) != now.get(key):
            return f"{key} is {earlier.get(key)!r} there, {now.get(key)!r} here"
    return ""


def mean_curve(summaries: Sequence[Mapping[str, Any]], metric: str = "test_acc") -> dict[str, Any]:
    """A pseudo-summary whose per-round rows average ``metric`` and bytes over runs (for plotting)."""
    rounds = [r["round"] for r in summaries[0]["per_round"]]
    rows = []
    for i, rnd in enumerate(rounds):
        row: dict[str, Any] = {"round": rnd,
                               "uplink_bytes": statistics.fmean(s["per_round"][i].get("uplink_bytes", 0)
                                                                for s in summaries)}
        if all(metric in s["per_round"][i] for s in summaries):
            row[metric] = statistics.fmean(s["per_round"][i][metric] for s in summaries)
        rows.append(row)
    return {"per_round": rows}


#: label of the reference row every accuracy table of a classification benchmark carries.
MAJORITY_LABEL = "majority class of the test split (reference)"


def majority_rates(configs: Sequence[Any]) -> list[float]:
    """Majority-class rate of the test split of each run configuration (one per seed).

    The same reader, subsample, split and seed as the benchmarked runs, so the
    figure is the accuracy of always predicting the test split's most frequent
    class: an accuracy at or below it shows nothing learnt beyond the class prior.
    """
    return [majority_rate_of_test_split(cfg) for cfg in configs]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    """Write JSON (creating parent folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float), encoding="utf-8")


def progress(message: str) -> None:
    """Benchmark progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def peak_step_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by torch on the CPU while ``fn`` runs, above the level at its start.

    Every profiler event's own allocations and frees (``self_cpu_memory_usage``)
    are summed in start-time order; the largest running total is the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


# -- timing shared by the perf blocks -------------------------------------------------------------------------
def interleaved(variants: dict[str, Callable[[], dict[str, Any]]], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Run every variant once per repeat, in turn; the results of each, in order."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for rep in range(repeats):
        for name, fn in variants.items():
            progress(f"perf: {name} ({rep + 1}/{repeats})")
            runs[name].append(fn())
    return runs


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    """Median of ``key`` over ``runs``."""
    return statistics.median(r[key] for r in runs)


def simulator_training(cfg: RunConfig) -> dict[str, Any]:
    """One simulator run of ``cfg``: the seconds of its rounds (evaluation excluded) and its local steps."""
    summary = Simulation(cfg, quiet=True, overwrite=True).run()
    rounds = [r for r in summary["per_round"] if r["round"] > 0]
    return {"seconds": sum(r["train_seconds"] for r in rounds), "steps": summary["timing"]["local_steps"]}


def plain_adamw_seconds(model: torch.nn.Module, cfg: RunConfig, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Seconds a bare transformers + peft loop takes for one AdamW step per batch (under ``train.autocast``)."""
    params = [p for p in model.parameters() if p.requires_grad]  # the adapter (and head) peft leaves trainable
    optimizer = torch.optim.AdamW(params, lr=cfg.train.optimizer.lr)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        with autocast_context(cfg, "cpu"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start
