"""Client resource profiles: seeded assignment of clients to profiles, and its report."""

from __future__ import annotations

from typing import Any

from fs_gmfl.core.hafl import ops
from fs_gmfl.core.hafl.config import HAFLConfig

FULL_PROFILE = "full"


def client_capacities(config: HAFLConfig, *, num_clients: int, r_max: int, seed: int) -> tuple[list[int], list[int]]:
    """Profile index (``-1``: no profile) and n_k (components trained per module) of every client id."""
    profile_of = ops.assign_profiles(num_clients, [p.share for p in config.profiles],
                                     [p.clients for p in config.profiles], seed=seed)
    trained = [config.trained_components(config.profiles[i] if i >= 0 else None, r_max) for i in profile_of]
    return profile_of, trained


def profile_report(config: HAFLConfig, profile_of: list[int], r_max: int) -> list[dict[str, Any]]:
    """One row per profile: name, capacity, n_k, client count and ids (for ``summary.json``)."""
    rows = []
    profiles = list(enumerate(config.profiles)) or [(-1, None)]
    for index, profile in profiles:
        ids = [c for c, p in enumerate(profile_of) if p == index]
        row: dict[str, Any] = {"name": profile.label() if profile else FULL_PROFILE,
                               "trained_components": config.trained_components(profile, r_max),
                               "clients": len(ids), "client_ids": ids}
        if profile is not None:
            row["rank" if config.scheme == "truncation" else "freeze_ratio"] = (
                profile.rank if config.scheme == "truncation" else profile.freeze_ratio)
        rows.append(row)
    return rows
