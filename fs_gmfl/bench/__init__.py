"""Benchmarks (``fs-gmfl bench NAME``): performance and accuracy targets live here, not in timed tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fs_gmfl.errors import ConfigError

BenchFn = Callable[[Sequence[str]], int]


def _load(name: str) -> BenchFn:
    if name == "gmfl":
        from fs_gmfl.bench.gmfl import main

        return main
    if name == "fedhft":
        from fs_gmfl.bench.fedhft import main

        return main
    if name == "fshost":
        from fs_gmfl.bench.fshost import main

        return main
    if name == "hafl":
        from fs_gmfl.bench.hafl import main

        return main
    if name == "fedkrso":
        from fs_gmfl.bench.fedkrso import main

        return main
    if name == "fseval":
        from fs_gmfl.bench.fseval import main

        return main
    if name == "perf":
        from fs_gmfl.bench.perf import main

        return main
    if name == "aggregate":
        from fs_gmfl.bench.aggregate import main

        return main
    if name == "llm":
        from fs_gmfl.bench.llm import main

        return main
    raise ConfigError("bench", name, "one of: aggregate, gmfl, hafl, fedkrso, fedhft, fshost, fseval, llm, perf")


def run_benchmark(name: str, args: Sequence[str]) -> int:
    """Run benchmark ``name`` with its own command-line ``args``."""
    return _load(name)(args)
