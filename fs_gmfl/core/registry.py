"""The method registry: each method declares itself once, in its own folder.

A method is described by one :class:`MethodSpec` (name and aliases, config
section, builder, cross-checks, byte estimator, supported hosts, example
overrides for tests). Everything that used to keep its own list of methods
(the config schema, ``fs-gmfl comm``, the FederatedScope checks, the
pre-flight memory estimate, the conformance tests) asks this registry instead.

Where specs come from, on first use:

* every ``fs_gmfl.core.<package>.spec`` module (the built-in methods; a new
  folder with a ``spec.py`` is found without editing any other file);
* every entry point of the group :data:`ENTRY_POINT_GROUP` (a third-party
  package: ``[project.entry-points."fs_gmfl.methods"] mine = "pkg.spec:SPEC"``,
  naming a :class:`MethodSpec` or a list of them);
* :func:`register_method` calls (tests, notebooks).

This module imports no host, no simulator and not the config schema, so the
schema can iterate it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from fs_gmfl.core.protocol import ClientAlgorithm, Strategy
from fs_gmfl.errors import InputError

if TYPE_CHECKING:
    from fs_gmfl.config.schema import RunConfig

#: entry-point group through which installed packages add methods.
ENTRY_POINT_GROUP = "fs_gmfl.methods"
#: host names a spec may list in :attr:`MethodSpec.hosts`.
HOSTS = ("sim", "fs")


@dataclass
class MethodContext:
    """What a method builder receives from the host.

    Attributes:
        cfg: the run configuration.
        initial: the initial global adapter (LoRA factors and head) by key.
        model_provider: host callback returning a model for adapter overrides
            (e.g. ``{"r": 4}``); ``None`` if the host has one fixed model.
            ``provider(r=4, lora_alpha=2.0)`` returns the model with a LoRA of
            that shape active on the same frozen backbone (its peft
            ``active_adapter`` names it; non-LoRA adapter tensors such as the
            head start as copies of the default adapter's); ``provider()``
            re-activates the default adapter.
        model: the host's model, for methods that train backbone weights
            (their initial values and shapes come from it); builders may
            switch off adapter branches their method does not use, and change
            nothing else. ``None`` if the host does not provide it.
    """

    cfg: RunConfig
    initial: dict[str, Tensor]
    model_provider: Callable[..., nn.Module] | None = None
    model: nn.Module | None = None

    def host_model(self) -> nn.Module:
        """The host's model, required by methods that train backbone weights.

        Raises:
            InputError: the host gave none.
        """
        if self.model is None:
            raise InputError(f"federate.method '{self.cfg.method}' trains backbone weights and needs the host's "
                             "model (MethodContext.model)")
        return self.model


@dataclass
class Method:
    """A built method: server strategy, client algorithm and facts to report.

    Attributes:
        load_global: set by methods that train backbone weights: puts the
            global trained tensors (targeted weights and head) into a host
            model, e.g. the server's model that the host evaluates and
            checkpoints, and tells the client algorithm that the model holds
            them. ``None`` for adapter methods (hosts load the adapter).
        clients_reset: set by methods whose server tracks what each client's
            model holds: called by a host whose clients restart from the
            initial model while the server resumes, so the next downlinks
            bring them from there.
    """

    strategy: Strategy
    client: ClientAlgorithm
    info: dict[str, Any] = field(default_factory=dict)
    load_global: Callable[[nn.Module], None] | None = None
    clients_reset: Callable[[], None] | None = None

    @property
    def trains_backbone(self) -> bool:
        """True for methods that train backbone weights (FedKRSO, FFT)."""
        return self.load_global is not None


@dataclass
class EstimateContext:
    """What a byte estimator (``fs-gmfl comm``, :attr:`MethodSpec.estimate`) receives; nothing in it holds weights.

    Attributes:
        cfg: the run configuration.
        initial: the initial global adapter (LoRA factors and head) on the meta device.
        build_method: builds the method as a host would for ``cfg`` (GMFL's wrapper included) on ``initial``.
        meta_model: builds a fresh backbone on the meta device (for methods that train backbone weights).
    """

    cfg: RunConfig
    initial: dict[str, Tensor]
    build_method: Callable[[], Method]
    meta_model: Callable[[], nn.Module]


Builder = Callable[[MethodContext], Method]
#: ``estimate(ctx)`` -> JSON-ready bytes per round (``fs-gmfl comm``; helpers in :mod:`fs_gmfl.core.estimate`).
Estimator = Callable[[EstimateContext], dict[str, Any]]
#: ``check(lookup)`` on a FederatedScope config; ``lookup(key)`` returns the plain value or ``None`` if absent.
HostCheck = Callable[[Callable[[str], Any]], None]


@dataclass(frozen=True)
class MethodSpec:
    """Everything the package needs to know about one method.

    Callables may be given as ``"module:attribute"`` strings, imported on
    first use (keeps heavy imports, e.g. the simulator's model builder, out of
    the config layer).

    Attributes:
        name: the ``federate.method`` value (lower case).
        build: the builder, ``build(ctx) -> Method``.
        aliases: other ``federate.method`` values meaning this method.
        summary: one line for ``fs-gmfl keys`` and error messages.
        config_section: the ``RunConfig`` field (YAML section) holding this
            method's settings (``None``: the method has none).
        config_class: the dataclass of that section (fields declared with
            :func:`~fs_gmfl.config.fields.opt`); the schema adds the section
            when it is imported, so a method with one must be found by
            discovery (its folder or an entry point), not registered later.
        check_config: cross-checks on the whole ``RunConfig``, run after the
            sections were built; raise :class:`~fs_gmfl.errors.ConfigError`.
        advise_config: warnings about valid settings that quietly do less than
            they seem to (one line each), logged at pre-flight by both hosts
            (:mod:`fs_gmfl.config.advice`).
        estimate: the ``fs-gmfl comm`` estimator, a function of the method's own folder
            (``estimate.py``; ``None``: not supported).
        hosts: hosts that can run it (``"sim"``, ``"fs"``).
        trains_backbone: trains full backbone weights (not an adapter).
        gmfl_base: ``gmfl.use`` may wrap it: its strategy and client implement
            :mod:`fs_gmfl.core.gmfl.base` (mask units, exclusion of frozen units).
        gmfl_refusal: why ``gmfl.use`` is refused with this method, if the
            generic "only with federate.method in ..." says too little.
        gmfl_stateful_sync: its clients can cache the adapter, so
            ``gmfl.downlink: stateful_sync`` may send only changed tensors.
        gmfl_masking: the class GMFL's wrapper keeps the mask with for this base
            (``None``: :class:`~fs_gmfl.core.gmfl.strategy.GlobalMasking`, the
            periodic refresh), called as ``masking(cfg.gmfl, unit_names, seed=...)``.
        client_weighting: its FedAvg weight follows ``federate.client_weight``.
        host_defaults: FederatedScope defaults that differ from the schema's, by key.
        check_host_config: extra checks on a FederatedScope config.
        example_overrides: ``KEY VALUE`` overrides that select the method in a
            tiny test run (the conformance suite runs every method with them).
    """

    name: str
    build: Builder | str
    aliases: tuple[str, ...] = ()
    summary: str = ""
    config_section: str | None = None
    config_class: type | None = None
    check_config: Callable[[RunConfig], None] | str | None = None
    advise_config: Callable[[RunConfig], list[str]] | str | None = None
    estimate: Estimator | str | None = None
    hosts: tuple[str, ...] = HOSTS
    trains_backbone: bool = False
    gmfl_base: bool = False
    gmfl_refusal: str = ""
    gmfl_stateful_sync: bool = False
    gmfl_masking: type | str | None = None
    client_weighting: bool = False
    host_defaults: Mapping[str, Any] = field(default_factory=dict)
    check_host_config: HostCheck | str | None = None
    example_overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for label in (self.name, *self.aliases):
            if not label or label != label.lower() or not label.replace("_", "").isalnum():
                raise ValueError(f"method name {label!r} must be lower-case letters, digits and '_'")
        if (self.config_section is None) != (self.config_class is None):
            raise ValueError(f"method '{self.name}': config_section and config_class go together")
        unknown = set(self.hosts) - set(HOSTS)
        if unknown:
            raise ValueError(f"method '{self.name}': unknown hosts {sorted(unknown)} (known: {list(HOSTS)})")

    @property
    def names(self) -> tuple[str, ...]:
        """The name followed by its aliases."""
        return (self.name, *self.aliases)

    def builder(self) -> Builder:
        """The builder, imported if it was given as a string."""
        return _resolve(self.build)

    def config_check(self) -> Callable[[RunConfig], None] | None:
        """The cross-checks, imported if given as a string."""
        return _resolve(self.check_config)

    def config_advice(self) -> Callable[[RunConfig], list[str]] | None:
        """The configuration warnings, imported if given as a string."""
        return _resolve(self.advise_config)

    def estimator(self) -> Estimator | None:
        """The ``fs-gmfl comm`` estimator, imported if given as a string."""
        return _resolve(self.estimate)

    def gmfl_masking_class(self) -> type | None:
        """GMFL's mask class for this base, imported if given as a string (``None``: the periodic one)."""
        return _resolve(self.gmfl_masking)

    def host_config_check(self) -> HostCheck | None:
        """The FederatedScope checks, imported if given as a string."""
        return _resolve(self.check_host_config)


def _resolve(ref: Any) -> Any:
    """``"module:attr"`` imported; anything else returned as is."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_SPECS: dict[str, MethodSpec] = {}
_BY_LABEL: dict[str, MethodSpec] = {}
_DISCOVERED = False


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry; registering the same spec again is a no-op.

    Raises:
        KeyError: its name or an alias already names a different method.
    """
    for label in spec.names:
        existing = _BY_LABEL.get(label)
        if existing is not None and existing != spec:
            raise KeyError(f"method name '{label}' is already registered (by method '{existing.name}')")
    _SPECS[spec.name] = spec
    _BY_LABEL.update(dict.fromkeys(spec.names, spec))
    return spec


def unregister_method(name: str) -> None:
    """Remove method ``name`` and its aliases (tests registering a temporary method)."""
    spec = _SPECS.pop(name)
    for label in spec.names:
        _BY_LABEL.pop(label, None)


def _discover() -> None:
    """Import the built-in ``fs_gmfl.core.*.spec`` modules and load the entry points, once."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import fs_gmfl.core as core

    for pkg in sorted(pkgutil.iter_modules(core.__path__), key=lambda m: m.name):
        if pkg.ispkg and importlib.util.find_spec(f"{core.__name__}.{pkg.name}.spec") is not None:
            for spec in _specs_in(importlib.import_module(f"{core.__name__}.{pkg.name}.spec")):
                register_method(spec)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        for spec in _specs_in(entry.load()):
            register_method(spec)


def _specs_in(obj: Any) -> list[MethodSpec]:
    """The specs a spec module (its ``SPECS`` list) or an entry point (a spec or a list) provides."""
    if isinstance(obj, MethodSpec):
        return [obj]
    if hasattr(obj, "SPECS"):
        obj = obj.SPECS
    specs = list(obj)
    if not all(isinstance(s, MethodSpec) for s in specs):
        raise TypeError(f"{obj!r} must be a MethodSpec, a list of them or a module with SPECS")
    return specs


def method_specs() -> list[MethodSpec]:
    """Every registered method, built-ins first (alphabetical by folder), then plug-ins."""
    _discover()
    return list(_SPECS.values())


def spec_of(name: str) -> MethodSpec:
    """The spec registered under ``name`` or one of its aliases.

    Raises:
        KeyError: no method has that name.
    """
    _discover()
    if name not in _BY_LABEL:
        raise KeyError(f"no method registered as '{name}' (known: {sorted(_SPECS)})")
    return _BY_LABEL[name]


def canonical_name(name: str) -> str:
    """The method's own name for ``name`` (an alias resolved)."""
    return spec_of(name).name


class MethodNames(Sequence[str]):
    """Every ``federate.method`` value (names and aliases), read from the registry when used.

    The schema declares ``choices=MethodNames()``, so methods registered after
    the schema was imported (entry points, tests) are accepted too.
    """

    def _labels(self) -> list[str]:
        return [label for spec in method_specs() for label in spec.names]

    def __getitem__(self, index: Any) -> Any:
        return self._labels()[index]

    def __len__(self) -> int:
        return len(self._labels())

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels())

    def __contains__(self, value: object) -> bool:
        _discover()
        return value in _BY_LABEL

    def __repr__(self) -> str:
        return repr(tuple(self._labels()))


def gmfl_bases() -> tuple[str, ...]:
    """``federate.method`` values GMFL can wrap (names and aliases)."""
    return tuple(label for spec in method_specs() if spec.gmfl_base for label in spec.names)


def methods_where(flag: str) -> tuple[str, ...]:
    """``federate.method`` values (names and aliases) whose spec sets the boolean field ``flag``."""
    return tuple(label for spec in method_specs() if getattr(spec, flag) for label in spec.names)
