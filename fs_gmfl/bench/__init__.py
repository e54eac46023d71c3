"""Benchmarks (``fs-gmfl bench NAME``): performance and accuracy targets live here, not in timed tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fs_gmfl.errors import ConfigError

BenchFn = Callable[[Sequence[str]], int]


def _load(name: str) -> BenchFn:
    if name == "gmfl":
        from fs_gmfl.bench.gmfl import main

        return main
    if name == "fedkrso":
        from fs_gmfl.bench.fedkrso import main

        return main
    raise ConfigError("bench", name, "one of: gmfl, fedkrso")


def run_benchmark(name: str, args: Sequence[str]) -> int:
    """Run benchmark ``name`` with its own command-line ``args``."""
    return _load(name)(args)
