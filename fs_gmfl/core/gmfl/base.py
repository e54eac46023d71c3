"""The small interface a method implements to become a GMFL base (GMFL as a wrapper, issue 15 item 3).

GMFL (Huang et al., ACL 2026, spec ``GMFL.md`` section 1) is "plug-and-play": it
freezes whole units of the base's adapter that the global update barely moves.
The wrapper (:mod:`fs_gmfl.core.gmfl.wrapper`) needs three things from the
base's server strategy and one from its client, declared here:

* :meth:`GMFLBase.mask_units` -- the mask unit: unit name -> the adapter keys
  the base trains and uploads together, in canonical order (the order of the
  wire mask). A unit never cuts what the base treats as one thing: FedIT and
  FFA-LoRA average every LoRA tensor on its own, so a unit is one tensor (as in
  the GMFL reference code); HAFL aggregates rank-1 components that live in a
  module's ``A`` rows and ``B`` columns, and FedHFT merges and re-factorises a
  module's ``B A``, so for both a unit is one adapted module (``A`` and ``B``).
  Heads are never units.
* :meth:`GMFLBase.unit_values` -- per unit, the global tensors whose change
  is GMFL's statistic ``u = sum |new - old|`` (spec section 4); snapshots that
  later aggregation does not modify in place.
* :meth:`GMFLBase.set_frozen` -- exclude the keys of frozen units: they are
  neither expected in uplinks nor aggregated, and keep their global value.
* :meth:`GMFLBaseClient.prepare_excluding` -- the client's ``prepare`` with
  some keys neither trained (not in ``LocalPlan.trainable``) nor uploaded by
  ``finish``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from fs_gmfl.core.message import Message
from fs_gmfl.core.protocol import LocalPlan

#: one unit's measured global tensors: a tensor, or several whose L1 changes are summed.
UnitValue = Tensor | Sequence[Tensor]


@runtime_checkable
class GMFLBase(Protocol):
    """Server side of a method GMFL can wrap (besides the :class:`~fs_gmfl.core.protocol.Strategy` methods)."""

    def mask_units(self) -> dict[str, tuple[str, ...]]:
        """Unit name -> the adapter keys that are frozen together, in the canonical (wire) order."""

    def unit_values(self) -> dict[str, UnitValue]:
        """Unit name -> the global tensors whose L1 change is the unit's statistic (not modified later in place)."""

    def set_frozen(self, keys: frozenset[str]) -> None:
        """From now on ``keys`` (whole units) are not expected in uplinks, not aggregated and keep their value."""


@runtime_checkable
class GMFLBaseClient(Protocol):
    """Client side of a method GMFL can wrap."""

    def prepare_excluding(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any],
                          frozen: frozenset[str]) -> LocalPlan:
        """``prepare``, with the adapter keys ``frozen`` neither trained nor uploaded by ``finish``."""


def frozen_keys(units: Mapping[str, Sequence[str]], frozen_units: Iterable[str]) -> frozenset[str]:
    """The adapter keys of the frozen units."""
    return frozenset(key for unit in frozen_units for key in units[unit])


def whole_units(units: Sequence[Sequence[str]], keys: frozenset[str], *, method: str) -> list[int]:
    """Indices of the units whose keys are all in ``keys``.

    Raises:
        ValueError: a unit is only partly in ``keys`` (a mask must never cut a unit).
    """
    out = []
    for index, unit in enumerate(units):
        inside = [k in keys for k in unit]
        if any(inside) and not all(inside):
            raise ValueError(f"{method}: GMFL may freeze whole units only; {list(unit)} is partly frozen")
        if all(inside):
            out.append(index)
    return out
