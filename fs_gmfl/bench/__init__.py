"""Benchmarks (``fs-gmfl bench NAME``): performance and accuracy targets live here, not in timed tests."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from fs_gmfl.errors import InputError

BenchFn = Callable[[Sequence[str]], int]

#: every benchmark: its name (the module ``fs_gmfl.bench.<name>``) and what it measures, in one line.
BENCHMARKS = {
    "aggregate": "server memory and time of one round's aggregation against the number of uplinks",
    "gmfl": "FedIT, FFA-LoRA, HAFL and FedHFT with and without GMFL: accuracy, uplink saving, step time",
    "hafl": "a miniature of HAFL's Table II: five LoRA schemes, accuracy, bytes, per-profile step time and memory",
    "fedkrso": "FedKRSO against FedIT and full fine-tuning: accuracy, bytes, memory and step time",
    "fedhft": "FedHFT's clustered masked adapters against FedIT: personalised and global accuracy, bytes",
    "fshost": "one YAML on both hosts (simulator and FederatedScope) side by side (needs FederatedScope)",
    "fseval": "FederatedScope-LLM's evaluation scripts on models fine-tuned under FederatedScope",
    "llm": "federated instruction tuning of SmolLM2 with every LoRA method, and fp32 against bf16",
    "perf": "where the simulator's time goes, against the limits it can reach",
}


def describe() -> str:
    """The benchmarks, one line each (for ``fs-gmfl bench --help``)."""
    width = max(map(len, BENCHMARKS))
    return "\n".join(f"  {name:<{width}}  {text}" for name, text in BENCHMARKS.items())


def _load(name: str) -> BenchFn:
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r} (allowed: {', '.join(BENCHMARKS)})")
    return importlib.import_module(f"fs_gmfl.bench.{name}").main


def run_benchmark(name: str, args: Sequence[str]) -> int:
    """Run benchmark ``name`` with its own command-line ``args``.

    Raises:
        InputError: no benchmark is called ``name``.
    """
    return _load(name)(args)
