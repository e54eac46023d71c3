"""Which clients train in a round and which rows each local batch holds: the same draw in both hosts.

Every choice derives from ``(seed, purpose, round, client)``
(:func:`fs_gmfl.core.seeding.generator`), so the simulator and the
FederatedScope host sample the same clients and batches for one seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.seeding import generator


def sample_clients(num_clients: int, per_round: int, *, seed: int, rnd: int) -> list[int]:
    """Uniform sample without replacement for round ``rnd`` (independent of other rounds)."""
    order = torch.randperm(num_clients, generator=generator(seed, "sample", rnd))
    return sorted(order[:per_round].tolist())


def batch_schedule(n: int, cfg: RunConfig, *, rnd: int, client_id: int) -> Iterator[Tensor]:
    """Row indices of each local batch: ``local_update_steps`` batches, or that many epochs."""
    bs = min(cfg.dataloader.batch_size, n)
    g = generator(cfg.seed, "batches", rnd, client_id)
    if cfg.train.batch_or_epoch == "epoch":
        for _ in range(cfg.train.local_update_steps):
            order = torch.randperm(n, generator=g)
            yield from torch.split(order, bs)
        return
    order = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(cfg.train.local_update_steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=g), 0
        yield order[pos:pos + bs]
        pos += bs


def count_batches(n: int, cfg: RunConfig) -> int:
    """Number of batches :func:`batch_schedule` yields."""
    if cfg.train.batch_or_epoch == "epoch":
        return cfg.train.local_update_steps * math.ceil(n / min(cfg.dataloader.batch_size, n))
    return cfg.train.local_update_steps
