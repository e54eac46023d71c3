"""Deterministic seed derivation.

Every random choice of a run (client sampling, batch order, dropout, ...)
draws from its own generator seeded by ``derive_seed(run_seed, purpose, ...)``,
so results do not depend on the order in which clients are simulated and a
resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (``derive_seed(0, "batches", 3, 17)``)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
