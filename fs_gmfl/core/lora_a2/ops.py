"""LoRA-A2's alternation (spec GMFL.md section 7.4): which LoRA factor a round trains.

Parity, a documented choice: odd rounds train ``lora_B``, even rounds
``lora_A`` (the head trains every round). This is the GMFL authors' code
(spec 7.4: "round 1 trains B, round 2 trains A, ...", ``fed/LoRA_A2.py``).
The arXiv paper's wording (spec 7.4: "A frozen in even rounds and B in odd
rounds") is the opposite parity; with ``lora_B`` initialised to zero a first
round training ``lora_A`` would get a zero gradient, so the code's order is
kept.
"""

from __future__ import annotations

from collections.abc import Iterable

from fs_gmfl.core.adapter import LORA_A, LORA_B, kind_of


def trained_factor(rnd: int) -> str:
    """The LoRA factor round ``rnd`` (1-based) trains: ``lora_B`` in odd rounds, ``lora_A`` in even ones."""
    return LORA_B if rnd % 2 == 1 else LORA_A


def idle_factor(rnd: int) -> str:
    """The LoRA factor round ``rnd`` keeps frozen (the other one)."""
    return LORA_A if trained_factor(rnd) == LORA_B else LORA_B


def idle_keys(keys: Iterable[str], rnd: int) -> frozenset[str]:
    """The keys of ``keys`` that round ``rnd`` neither trains nor uploads nor aggregates."""
    idle = idle_factor(rnd)
    return frozenset(k for k in keys if kind_of(k) == idle)
