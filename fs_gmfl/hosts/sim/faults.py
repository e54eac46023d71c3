"""Simulated client failures of the embedded simulator (the ``faults:`` YAML subtree).

Each sampled client of a round meets one fate, drawn from its own generator
``derive_seed(seed, "faults", round, client)`` so the draw does not depend on
the other clients, on the order of simulation, or on the other probabilities:

* ``dropped_before``: the client receives and loads its downlink (counted;
  caches and catch-up state follow what the server sent), then goes offline
  without training and never answers;
* ``dropped_after``: the client trains, but its uplink is lost on the way
  (not counted, not aggregated);
* ``late``: a straggler whose simulated reply time exceeds the deadline; it
  trains and sends (the uplink's bytes are counted, they crossed the
  network), but the server has closed the round and does not aggregate it;
* ``on_time``: the reply is aggregated.

Independently of the fates, a client listed in ``nan_clients`` is broken or
hostile: every uplink it sends has NaN in each floating-point entry
(:func:`nan_uplink`), so the server's uplink check rejects it.

Time is simulated (no sleeping): every client needs ``client_seconds``; a
straggler needs ``client_seconds + u * straggler_delay`` with ``u`` uniform
in [0, 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fs_gmfl.config.faults import FaultsConfig
from fs_gmfl.core.message import Message
from fs_gmfl.core.seeding import generator

ON_TIME = "on_time"
DROPPED_BEFORE = "dropped_before"
DROPPED_AFTER = "dropped_after"
LATE = "late"
FATES = (ON_TIME, DROPPED_BEFORE, DROPPED_AFTER, LATE)


def client_fate(cfg: FaultsConfig, *, seed: int, rnd: int, client_id: int) -> tuple[str, float]:
    """The fate of one client in round ``rnd`` and its simulated reply time (seconds; 0 when it never replies)."""
    u_before, u_after, u_straggler, u_delay = torch.rand(4, generator=generator(seed, "faults", rnd, client_id),
                                                         dtype=torch.float64).tolist()
    if u_before < cfg.dropout_before:
        return DROPPED_BEFORE, 0.0
    if u_after < cfg.dropout_after:
        return DROPPED_AFTER, 0.0
    seconds = cfg.client_seconds
    if u_straggler < cfg.straggler_fraction:
        seconds += u_delay * cfg.straggler_delay
    if cfg.deadline > 0 and seconds > cfg.deadline:
        return LATE, seconds
    return ON_TIME, seconds


def round_fates(cfg: FaultsConfig, clients: Sequence[int], *, seed: int, rnd: int) -> dict[int, tuple[str, float]]:
    """:func:`client_fate` of every sampled client."""
    return {cid: client_fate(cfg, seed=seed, rnd=rnd, client_id=cid) for cid in clients}


def nan_uplink(message: Message) -> Message:
    """``message`` with every floating-point tensor entry NaN (the uplink of a broken or hostile client)."""
    return Message({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                    for k, v in message.tensors.items()}, dict(message.control))
