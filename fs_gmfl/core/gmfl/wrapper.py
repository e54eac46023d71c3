"""GMFL as a wrapper around any base method that declares its mask units (issue 15 item 3).

Huang et al., "GMFL: Efficient Global Masking for Federated LLM Fine-tuning"
(ACL 2026) present GMFL as plug-and-play on top of a federated LoRA method;
here it is one strategy and one client that wrap a base through the interface
of :mod:`fs_gmfl.core.gmfl.base`, as Flower wraps any strategy for
differential privacy:

* :class:`GMFLStrategy` tells the base which units are frozen before every
  round, adds the packed mask to the base's downlinks (:mod:`.wire`),
  measures each unit's global update after the base aggregated, and refreshes
  the mask every ``period`` rounds (:class:`~fs_gmfl.core.gmfl.strategy.GlobalMasking`,
  spec ``GMFL.md`` sections 4-5);
* :class:`GMFLClient` reads the mask and asks the base client to prepare with
  the frozen units' keys neither trained nor uploaded.

The base's own aggregation math is untouched; frozen units are simply not part
of it. Without any frozen unit (a ratio that never freezes) the wrapped base
computes bit for bit what the base computes alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from fs_gmfl.core.fedavg.client import LoraClient
from fs_gmfl.core.gmfl.base import GMFLBase, GMFLBaseClient, frozen_keys
from fs_gmfl.core.gmfl.strategy import GlobalMasking
from fs_gmfl.core.gmfl.wire import MASK
from fs_gmfl.core.message import Message, Reply, pack_bits, unpack_bits
from fs_gmfl.core.protocol import ClientAlgorithm, LocalPlan, RoundAggregation, RoundReport, Strategy, TrainStats
from fs_gmfl.core.registry import Method, spec_of
from fs_gmfl.core.seeding import derive_seed

if TYPE_CHECKING:
    from fs_gmfl.config.schema import RunConfig

#: ``gmfl.downlink`` modes: when the mask travels.
MASK_SYNC_MODES = ("stateless", "stateful_sync")
#: ``client_state`` entry where a ``stateful_sync`` client keeps its last mask flags.
MASK_CACHE = "mask"
#: ``LocalPlan.info`` entry with the keys the client must not upload.
FROZEN_INFO = "gmfl_frozen"


class GMFLStrategy(Strategy):
    """GMFL's server: global masking of the base's mask units.

    Args:
        base: the wrapped strategy (implements :class:`~fs_gmfl.core.gmfl.base.GMFLBase`).
        masking: the mask state; its candidates must be the base's unit names, in order.
        mask_sync: ``"stateless"`` (the mask to every sampled client once a
            refresh happened) or ``"stateful_sync"`` (only when it changed
            since the client's last mask; clients cache it).

    Attributes the wrapper does not have are read from the base (its
    ``policy``, ``global_state``, ...), so hosts and tools see the base's.
    """

    def __init__(self, base: Strategy, masking: GlobalMasking, *, mask_sync: str = "stateless") -> None:
        if not isinstance(base, GMFLBase):
            raise TypeError(f"{type(base).__name__} does not implement the GMFL base interface "
                            "(mask_units, unit_values, set_frozen)")
        if mask_sync not in MASK_SYNC_MODES:
            raise ValueError(f"unknown mask sync {mask_sync!r}; expected one of {MASK_SYNC_MODES}")
        self.base = base
        self.units = base.mask_units()
        if list(self.units) != masking.candidate_keys:
            raise ValueError("the mask's candidates must be the base's mask units, in the base's order")
        self.masking = masking
        self.mask_sync = mask_sync
        self.name = f"{base.name}+gmfl"
        self.mask_versions: dict[int, int] = {}
        self._unit_numel: dict[str, int] | None = None
        self._apply_mask()

    def __getattr__(self, name: str) -> Any:
        """The base's attribute (only reached when the wrapper has none of that name)."""
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def _apply_mask(self) -> None:
        """Tell the base the current frozen keys (also after a mask was set directly on :attr:`masking`)."""
        self.base.set_frozen(frozen_keys(self.units, self.masking.frozen))

    # -- downlink ------------------------------------------------------------------------------
    def configure_round(self, rnd: int, clients: Sequence[int]) -> dict[int, Message]:
        """The base's downlinks, with the packed mask where the client needs it."""
        self._apply_mask()
        messages = self.base.configure_round(rnd, clients)
        flags = pack_bits(self.masking.trainable_flags())
        for cid, message in messages.items():
            if self._sends_mask(cid):
                message.control[MASK] = flags.clone()
        return messages

    def _sends_mask(self, cid: int) -> bool:
        """Stateless: once a refresh happened; stateful: when the mask changed since the client's last one."""
        version = self.masking.version
        if self.mask_sync == "stateful_sync" and cid in self.mask_versions:
            send = version != self.mask_versions[cid]
        else:
            send = self.masking.refreshes > 0
        if self.mask_sync == "stateful_sync":
            self.mask_versions[cid] = version
        return send

    # -- aggregation ---------------------------------------------------------------------------
    def start_aggregation(self, rnd: int) -> RoundAggregation:
        """The base's streaming aggregation of the unfrozen units; :meth:`after_round` runs when it finishes."""
        self._apply_mask()
        return _MeasuredRound(self, rnd, self.base.unit_values(), self.base.start_aggregation(rnd))

    def after_round(self, rnd: int, old: Mapping[str, Any], report: RoundReport) -> None:
        """Measure each unit's global update (spec GMFL.md section 4) and maybe refresh the mask (section 5)."""
        updated = bool(report.accepted)
        new = self.base.unit_values() if updated else None
        if self.masking.observe(rnd, old if updated else None, new):
            self._apply_mask()

    # -- reporting -----------------------------------------------------------------------------
    def global_adapter(self) -> dict[str, Tensor]:
        """The base's global adapter."""
        return self.base.global_adapter()

    def evaluation_adapters(self) -> dict[str, dict[str, Tensor]]:
        """The base's extra evaluation adapters."""
        return self.base.evaluation_adapters()

    def round_metrics(self) -> dict[str, float]:
        """The base's metrics plus the frozen fraction of units (by count and by adapter elements) and the ratio."""
        sizes = self.unit_numel()
        frozen = sum(sizes[u] for u in self.masking.frozen)
        return {**self.base.round_metrics(), "frozen_fraction": self.masking.frozen_fraction,
                "frozen_numel_fraction": frozen / sum(sizes.values()), "freeze_ratio": self.masking.ratio}

    def unit_numel(self) -> dict[str, int]:
        """Adapter elements of each unit (read once from the base's global adapter)."""
        if self._unit_numel is None:
            adapter = self.base.global_adapter()
            self._unit_numel = {u: sum(adapter[k].numel() for k in keys) for u, keys in self.units.items()}
        return self._unit_numel

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base's state, the mask state and each client's last mask version."""
        return {"base": self.base.state_dict(), "masking": self.masking.state_dict(),
                "mask_versions": dict(self.mask_versions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.base.load_state_dict(state["base"])
        self.masking.load_state_dict(state["masking"])
        self.mask_versions = {int(c): int(v) for c, v in state["mask_versions"].items()}
        self._apply_mask()


class _MeasuredRound(RoundAggregation):
    """The base's round aggregation, followed by GMFL's measurement of the global update when it finishes."""

    def __init__(self, strategy: GMFLStrategy, rnd: int, old: Mapping[str, Any], base: RoundAggregation) -> None:
        self.strategy, self.rnd, self.old, self.base = strategy, rnd, old, base

    def add(self, reply: Reply) -> str | None:
        """The base screens and folds the reply (GMFL keeps nothing of it)."""
        return self.base.add(reply)

    def finish(self) -> RoundReport:
        """The base's new global state, then GMFL's statistic and refresh."""
        report = self.base.finish()
        self.strategy.after_round(self.rnd, self.old, report)
        return report


class GMFLClient(ClientAlgorithm):
    """GMFL's client: reads the mask, lets the base train and upload everything but the frozen units.

    Args:
        base: the wrapped client (implements :class:`~fs_gmfl.core.gmfl.base.GMFLBaseClient`).
        units: the base's mask units (unit name -> adapter keys), in the wire order.
        cache_mask: keep the last mask in ``client_state`` (``gmfl.downlink: stateful_sync``).

    Attributes the wrapper does not have are read from the base.
    """

    def __init__(self, base: ClientAlgorithm, units: Mapping[str, Sequence[str]], *, cache_mask: bool = False) -> None:
        if not isinstance(base, GMFLBaseClient):
            raise TypeError(f"{type(base).__name__} does not implement the GMFL base interface (prepare_excluding)")
        self.base = base
        self.units = {u: tuple(keys) for u, keys in units.items()}
        self.cache_mask = cache_mask

    def __getattr__(self, name: str) -> Any:
        """The base's attribute (only reached when the wrapper has none of that name)."""
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def prepare(self, model: nn.Module, message: Message, client_state: MutableMapping[str, Any]) -> LocalPlan:
        """The base's plan without the frozen units' keys."""
        frozen = frozenset(self._frozen_keys(message, client_state))
        base_message = Message(message.tensors, {k: v for k, v in message.control.items() if k != MASK})
        plan = self.base.prepare_excluding(model, base_message, client_state, frozen)
        trained_frozen = sorted(frozen & set(plan.trainable))
        if trained_frozen:
            raise RuntimeError(f"{type(self.base).__name__} would train frozen keys {trained_frozen[:2]}")
        plan.info[FROZEN_INFO] = frozen
        return plan

    def _frozen_keys(self, message: Message, client_state: MutableMapping[str, Any]) -> set[str]:
        """The adapter keys of the units the downlink's (or the cached) mask freezes."""
        if MASK in message.control:
            flags = unpack_bits(message.control[MASK], len(self.units)).tolist()
            if self.cache_mask:
                client_state[MASK_CACHE] = flags
        elif self.cache_mask and MASK_CACHE in client_state:
            flags = client_state[MASK_CACHE]
        else:
            return set()
        return set(frozen_keys(self.units, (u for u, trainable in zip(self.units, flags) if not trainable)))

    def finish(self, plan: LocalPlan, stats: TrainStats, client_state: MutableMapping[str, Any]) -> Message:
        """The base's uplink (which never carries a frozen unit)."""
        uplink = self.base.finish(plan, stats, client_state)
        leaked = plan.info.get(FROZEN_INFO, frozenset()) & set(uplink.tensors)
        if leaked:
            raise RuntimeError(f"{type(self.base).__name__} uploaded frozen keys {sorted(leaked)[:2]}")
        return uplink

    def host_state_dict(self, model: nn.Module) -> dict[str, Any]:
        """The base's host state."""
        return self.base.host_state_dict(model)

    def load_host_state_dict(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Restore the base's host state."""
        self.base.load_host_state_dict(model, state)


def wrap_method(method: Method, cfg: RunConfig) -> Method:
    """The built base ``method`` wrapped by GMFL as ``cfg.gmfl`` says (``gmfl.use``), with the base's mask class
    (:attr:`~fs_gmfl.core.registry.MethodSpec.gmfl_masking`)."""
    units = method.strategy.mask_units()
    masking_class = spec_of(cfg.method).gmfl_masking_class() or GlobalMasking
    masking = masking_class(cfg.gmfl, list(units), seed=derive_seed(cfg.seed, "gmfl"))
    strategy = GMFLStrategy(method.strategy, masking, mask_sync=cfg.gmfl.downlink)
    client = GMFLClient(method.client, units, cache_mask=cfg.gmfl.downlink == "stateful_sync")
    return dataclasses.replace(method, strategy=strategy, client=client,
                               info={**method.info, "mask_candidates": len(units)})


def gmfl_lora_client(variant: str, candidate_keys: Sequence[str], *, stateful: bool = False) -> GMFLClient:
    """GMFL's client over a FedIT / FFA-LoRA client, one mask unit per candidate tensor."""
    return GMFLClient(LoraClient(variant, stateful=stateful), {k: (k,) for k in candidate_keys}, cache_mask=stateful)
