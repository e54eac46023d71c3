"""FederatedScope configuration <-> fs_gmfl configuration, in one place.

Three jobs:

* :func:`extend_cfg` adds to a FederatedScope config every fs_gmfl key it lacks,
  generated from the :class:`~fs_gmfl.config.schema.RunConfig` dataclasses
  (method subtrees such as ``gmfl``, and the simulator's ``model.*``/``data.*``
  keys so one YAML file loads in both hosts), and registers :func:`check_cfg`;
* :func:`check_cfg` validates on every merge and on freeze: each method subtree
  is built into its dataclass, and a run of an fs_gmfl method is checked for
  FederatedScope features the adapter does not support; every problem raises
  :class:`~fs_gmfl.errors.ConfigError` (a ``ValueError``) naming the key;
* :func:`to_run_config` converts a (frozen) FederatedScope config into the
  :class:`RunConfig` the algorithm cores and fs_gmfl's model/data builders see.

The conversion itself works on any nested mapping and imports nothing from
FederatedScope; only :func:`extend_cfg` does, lazily.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fs_gmfl.config.fields import build, iter_keys
from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.registry import method_specs, spec_of
from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.common.corpus import READERS

#: ``trainer.type`` of the fs_gmfl trainer (a subclass of FederatedScope's ``llmtrainer``).
TRAINER_TYPE = "fs_gmfl_llmtrainer"
#: model hub suffix of fs_gmfl's own backbones under FederatedScope: ``model.type: tiny_bert@fs_gmfl_llm``.
MODEL_HUB = "fs_gmfl_llm"
#: derived key ``model.fs_gmfl_backbone``: the backbone spec written by fs_gmfl's data builder (internal).
BACKBONE_KEY = "fs_gmfl_backbone"
#: FederatedScope passes every key of these nodes to torch as keyword arguments: fs_gmfl never adds keys there.
FS_KWARG_NODES = ("train.optimizer.", "train.scheduler.")
#: FederatedScope defaults that mean "not set" for an fs_gmfl backbone (FederatedScope's own models use them).
FS_UNSET_DEFAULTS = {"model.task": "node", "model.num_labels": 1, "data.splitter": ""}
#: keys the cores and the fs_gmfl builders rely on: a value fs_gmfl cannot accept is an error, not a fallback.
ALWAYS_STRICT = ("seed", "federate.", "llm.adapter.use", "llm.adapter.args[0].r", "llm.adapter.args[0].lora_alpha")
#: additionally strict when fs_gmfl's own data and backbone run inside FederatedScope.
SIM_STRICT = ("data.", "model.", "dataloader.", "llm.", "train.local_update_steps", "train.batch_or_epoch")

#: fs_gmfl keys whose default differs under FederatedScope (the simulator-only choice is not available there).


def host_defaults() -> dict[str, Any]:
    """Defaults under this host that differ from the schema's (each method's ``MethodSpec.host_defaults``)."""
    return {key: value for spec in method_specs() for key, value in spec.host_defaults.items()}


#: bookkeeping entries FederatedScope's config nodes keep among their items.
FS_INTERNAL_KEYS = frozenset({"__cfg_check_funcs__", "__help_info__", "is_ready_for_run"})

_MISSING = object()
logger = logging.getLogger(__name__)
_INDEX = re.compile(r"^(\w+)\[(\d+)\]$")


# -- what fs_gmfl owns -----------------------------------------------------------------------------
def owned_methods() -> list[str]:
    """``federate.method`` values whose workers fs_gmfl provides (FederatedScope's own ``fedavg`` is not one).

    Registered methods whose spec lists the ``fs`` host, without aliases.
    """
    return sorted(spec.name for spec in method_specs() if "fs" in spec.hosts)


def method_sections() -> dict[str, type]:
    """Top-level config subtrees of the algorithm cores (``gmfl``, each method's section), with their dataclass."""
    hints = typing.get_type_hints(RunConfig)
    declared = {spec.config_section for spec in method_specs()}
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])
            and (f.name in declared or hints[f.name].__module__.startswith("fs_gmfl.core."))}


def is_sim_data(data_type: str) -> bool:
    """Whether ``data.type`` names one of fs_gmfl's datasets (built by fs_gmfl's data builder)."""
    kind, _, rest = data_type.partition(":")
    return data_type in READERS or data_type == "synthetic" or (kind in ("csv", "jsonl") and bool(rest))


def is_sim_model(model_type: str) -> bool:
    """Whether ``model.type`` names an fs_gmfl backbone (``<type>@fs_gmfl_llm``)."""
    return model_type.rpartition("@")[2] == MODEL_HUB and "@" in model_type


# -- reading values out of a nested config ---------------------------------------------------------
def plain(value: Any) -> Any:
    """A config value as plain Python data (FederatedScope ``Argument`` unwrapped, tuples as lists)."""
    if type(value).__name__ == "Argument":
        value = value.value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items() if k not in FS_INTERNAL_KEYS}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def lookup(cfg: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` (``_MISSING`` if absent)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
    data[parts[-1]] = value


def _drop(data: dict[str, Any], key: str) -> bool:
    """Remove the entry at ``key`` (``a.b[0].c`` style); False if there is none."""
    node: Any = data
    parts = key.split(".")
    for part in parts[:-1]:
        match = _INDEX.match(part)
        if match:
            seq = node.get(match.group(1)) if isinstance(node, dict) else None
            index = int(match.group(2))
            if not isinstance(seq, list) or index >= len(seq):
                return False
            node = seq[index]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    last = _INDEX.match(parts[-1])
    name = last.group(1) if last else parts[-1]
    if not isinstance(node, dict) or name not in node:
        return False
    del node[name]
    return True


# -- FederatedScope config -> RunConfig ------------------------------------------------------------
def collect(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Every RunConfig key present in ``cfg``, as a nested plain dict (FederatedScope 'unset' defaults left out)."""
    data: dict[str, Any] = {}
    for key, *_ in iter_keys(RunConfig):
        value = lookup(cfg, key)
        if value is _MISSING or FS_UNSET_DEFAULTS.get(key, _MISSING) == value:
            continue
        _set(data, key, plain(value))
    federate = data.get("federate", {})
    if isinstance(federate.get("method"), str):
        federate["method"] = federate["method"].lower()
    return data


def _strict(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p) for p in prefixes)


def to_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """The :class:`RunConfig` of a FederatedScope config.

    Keys the cores or fs_gmfl's builders rely on must hold values fs_gmfl
    accepts (:data:`ALWAYS_STRICT`, plus :data:`SIM_STRICT` when fs_gmfl's data
    and backbone run inside FederatedScope). Any other key whose
    FederatedScope value fs_gmfl's schema does not accept (an optimizer type
    fs_gmfl does not list, the ``meta`` splitter, an extra LoRA argument) is
    left at fs_gmfl's default: FederatedScope, not fs_gmfl, interprets it.

    Raises:
        ConfigError: a strict key holds a value fs_gmfl does not accept.
    """
    data = collect(cfg)
    sim = is_sim_data(str(lookup(cfg, "data.type"))) or is_sim_model(str(lookup(cfg, "model.type")))
    strict = ALWAYS_STRICT + tuple(f"{s}." for s in method_sections()) + (SIM_STRICT if sim else ())
    while True:
        try:
            return build(RunConfig, data)
        except ConfigError as err:
            if _strict(err.key, strict) or not _drop(data, err.key):
                raise


# -- FederatedScope-only parts (import federatedscope lazily) --------------------------------------
def extend_cfg(cfg: Any) -> None:
    """Add every missing fs_gmfl key to FederatedScope config ``cfg`` and register :func:`check_cfg`.

    Idempotent: a config that already has the fs_gmfl keys is left alone.
    """
    if BACKBONE_KEY in cfg.get("model", {}):
        return
    from federatedscope.core.configs.config import CN

    defaults = host_defaults()
    for key, default, _, meta, _ in iter_keys(RunConfig):
        if key.startswith(FS_KWARG_NODES):
            continue
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node:
                setattr(node, part, CN())
            node = node[part]
        if leaf not in node:
            setattr(node, leaf, copy.deepcopy(defaults.get(key, default)))
            cfg.__help_info__.setdefault(key, meta.get("help", ""))
    setattr(cfg.model, BACKBONE_KEY, "")
    cfg.register_cfg_check_fun(check_cfg)


def check_cfg(cfg: Any) -> None:
    """FederatedScope check function: validate fs_gmfl's subtrees and what an fs_gmfl run needs.

    Checks the *effective* configuration: while the launcher's command-line
    ``KEY VALUE`` pairs are not merged yet (FederatedScope's main runs the
    checks inside ``merge_from_file``, before the overrides), they are applied
    to a copy first. Once they are in, the one switch of each method is
    resolved in ``cfg`` itself (:func:`resolve_switches`).

    Raises:
        ConfigError: an invalid value, an fs_gmfl subtree enabled for a method
            fs_gmfl does not run, or a FederatedScope feature the adapter does
            not support; the message names the effective value and where it
            came from (command line, file or default).
    """
    view, pending = _effective_view(cfg)
    try:
        resolve_paths(view)
        resolve_switches(view, announce=not pending)
        _check_effective(view)
        if not pending:
            resolve_output_name(view)
    except ConfigError as err:
        raise _with_source(err) from None


def _check_effective(cfg: Any) -> None:
    method = str(plain(lookup(cfg, "federate.method"))).lower()
    ours = method in owned_methods()
    for name, section_cls in method_sections().items():
        node = plain(cfg.get(name)) or {}
        if node.get("use", True) is False:
            continue
        fs_switch = name in FS_OWN_SECTIONS  # FederatedScope's own algorithm when the method is not fs_gmfl's
        build(section_cls, {k: v for k, v in node.items() if not (fs_switch and k == "use")}, prefix=name + ".")
        if "use" in node and not ours and not fs_switch:
            raise ConfigError(f"{name}.use", True, f"federate.method one of {owned_methods()} (fs_gmfl's workers), "
                              f"or '{FS_FEDAVG}' which it turns into '{FEDAVG_EQUIVALENT}'; '{method}' is run by "
                              f"FederatedScope itself, which would ignore '{name}'")
    if ours:
        _check_supported(cfg)
        to_run_config(cfg)
        _check_half_adam(cfg)


#: float16's smallest positive value is about 6e-8: a smaller Adam eps rounds to 0 there.
FLOAT16_TINY = 6e-8


def _check_half_adam(cfg: Any) -> None:
    """Refuse Adam/AdamW under ``train.is_enable_half`` (FederatedScope's float16) with an eps float16 rounds to 0:
    the first step of a tensor whose gradient is exactly 0 (LoRA A while B is 0) divides 0 by 0, so every update
    is NaN and rejected, and the run would train nothing."""
    optimizer = plain(lookup(cfg, "train.optimizer")) or {}
    eps = optimizer.get("eps", 1e-8)
    half = bool(plain(lookup(cfg, "train.is_enable_half")))
    kind = str(optimizer.get("type", ""))
    if half and kind.lower() in ("adam", "adamw") and float(eps) < FLOAT16_TINY:
        raise ConfigError("train.optimizer.type", kind, f"SGD (FederatedScope's default), or {kind} with "
                          f"train.optimizer.eps >= {FLOAT16_TINY}, with train.is_enable_half True: float16 rounds "
                          f"eps {eps} to 0 and the first step makes every update NaN (or train.is_enable_half False)")


# -- one switch per method -------------------------------------------------------------------------
#: FederatedScope's default ``federate.method`` (LoRA FedAvg with an adapter), which is fs_gmfl's ``fedit``.
FS_FEDAVG = "fedavg"
FEDAVG_EQUIVALENT = "fedit"
#: FederatedScope's own LLM trainer, replaced by fs_gmfl's subclass for fs_gmfl methods.
FS_LLM_TRAINER = "llmtrainer"


def resolve_switches(cfg: Any, *, announce: bool = True) -> None:
    """Turn an unmodified FederatedScope-LLM config plus one method switch into an fs_gmfl run (in place).

    * ``federate.method: fedavg`` (FederatedScope's default) with an enabled
      method subtree that rides on FedIT (``gmfl.use: True``) becomes
      ``fedit``: LoRA FedAvg is FedIT;
    * for an fs_gmfl method whose section FederatedScope declares too
      (``fedprox``), FederatedScope's ``use`` of that section is switched on:
      FederatedScope deletes every other key of a section whose ``use`` is
      False when the run starts (the fs_gmfl trainer then leaves out
      FederatedScope's own proximal regulariser: the method adds its term);
    * for an fs_gmfl method, ``trainer.type: llmtrainer`` (FederatedScope's,
      set by every baseline config) becomes ``fs_gmfl_llmtrainer``.

    Each change is recorded once (``announce``) for the server to log (FederatedScope's logger is not set up
    yet while the configuration is merged); a frozen config is left alone.
    """
    if getattr(cfg, "is_frozen", lambda: False)():
        return
    changes = []
    method = str(plain(lookup(cfg, "federate.method"))).lower()
    riders = [name for name in method_sections() if _enabled(cfg, name) and name in FEDIT_RIDERS]
    if method == FS_FEDAVG and riders:
        cfg.federate.method = FEDAVG_EQUIVALENT
        method = FEDAVG_EQUIVALENT
        changes.append(f"federate.method '{FS_FEDAVG}' -> '{FEDAVG_EQUIVALENT}' ({', '.join(riders)}.use is True; "
                       "LoRA FedAvg is FedIT)")
    section = spec_of(method).config_section if method in owned_methods() else None
    if section in FS_OWN_SECTIONS and plain(lookup(cfg, f"{section}.use")) is False:
        cfg[section].use = True
        changes.append(f"{section}.use False -> True (FederatedScope deletes the other {section}.* keys while its "
                       f"own switch is off, and federate.method '{method}' reads them)")
    if method in owned_methods() and str(plain(lookup(cfg, "trainer.type"))).lower() == FS_LLM_TRAINER:
        cfg.trainer.type = TRAINER_TYPE
        changes.append(f"trainer.type '{FS_LLM_TRAINER}' -> '{TRAINER_TYPE}' (fs_gmfl's subclass of it, "
                       f"for federate.method '{method}')")
    if announce:
        SWITCHES.extend(c for c in changes if c not in SWITCHES)


#: method subtrees that extend FedIT (enabled on top of federate.method fedit / FederatedScope's fedavg).
FEDIT_RIDERS = ("gmfl",)
#: what :func:`resolve_switches` changed in this process, in words (logged by the server).
SWITCHES: list[str] = []


def _enabled(cfg: Any, section: str) -> bool:
    return plain(lookup(cfg, f"{section}.use")) is True


#: method sections FederatedScope declares itself, with a ``use`` switch of its own (its FedProx plug-in,
#: ``fedprox.use`` and ``fedprox.mu``, in ``federatedscope/core/configs/cfg_fl_algo.py``).
FS_OWN_SECTIONS = ("fedprox",)


# -- paths that do not depend on the working directory ---------------------------------------------
#: keys whose values may hold the placeholders of :func:`resolve_paths`.
PATH_KEYS = ("outdir", "data.root", "data.type", "model.type", "federate.save_to", "federate.restore_from")
CFG_DIR, OUTDIR = "{cfg_dir}", "{outdir}"


def resolve_paths(cfg: Any) -> None:
    """Expand ``{cfg_dir}`` (the directory of the ``--cfg`` YAML file) and ``{outdir}`` (the run's ``outdir``)
    in path-valued keys (:data:`PATH_KEYS`), in place, so a config runs from any working directory.

    ``{cfg_dir}`` needs the ``--cfg`` file of the command line (the launcher,
    or FederatedScope's main with the plug-in entry point); ``{outdir}``
    follows an ``outdir`` override. Other relative paths keep FederatedScope's
    meaning (relative to the working directory).

    Raises:
        ConfigError: ``{cfg_dir}`` is used but no ``--cfg`` file is known.
    """
    if getattr(cfg, "is_frozen", lambda: False)():
        return
    line = _command_line()
    for key in PATH_KEYS:
        value = plain(lookup(cfg, key))
        if not isinstance(value, str) or "{" not in value:
            continue
        if CFG_DIR in value:
            if line is None or not line.cfg_file:
                raise ConfigError(key, value, f"a path without '{CFG_DIR}' when no --cfg file is known (run it "
                                  "with fs-gmfl fs-run --cfg FILE)")
            head, at, hub = value.replace(CFG_DIR, str(Path(line.cfg_file).resolve().parent)).rpartition("@")
            value = os.path.normpath(head) + at + hub if at else os.path.normpath(hub)
        if OUTDIR in value and key != "outdir":
            value = value.replace(OUTDIR, str(plain(lookup(cfg, "outdir"))))
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        setattr(node, leaf, value)


def resolve_output_name(cfg: Any) -> None:
    """Give an fs_gmfl run without ``expname`` a flat one, and warn when a restored run will not find its directory.

    FederatedScope names such a run ``<method>_<model.type>_on_<data.type>_lr.._lstep..`` and writes it to
    ``<outdir>/<that name>``: a model or data *path* in it nests the output directory along the path (e.g.
    ``exp/fedit_/models/llama-7b@huggingface_llm_on_.../``). fs_gmfl keeps FederatedScope's pattern with the last
    path component of each. A run whose output directory exists already is written by FederatedScope into
    ``<dir>/sub_exp_<time>/``: with ``federate.restore_from`` that directory's ``summary.json`` lists the rounds
    after the restore only, which the warning says.
    """
    if getattr(cfg, "is_frozen", lambda: False)() or str(plain(lookup(cfg, "federate.method"))) not in owned_methods():
        return
    if not plain(lookup(cfg, "expname")):
        model, data = str(plain(lookup(cfg, "model.type"))), str(plain(lookup(cfg, "data.type")))
        if os.sep in model or os.sep in data:
            name = (f"{plain(lookup(cfg, 'federate.method'))}_{_last_component(model)}_on_{_last_component(data)}"
                    f"_lr{plain(lookup(cfg, 'train.optimizer.lr'))}_lstep{plain(lookup(cfg, 'train.local_update_steps'))}")
            cfg.expname = name
            logger.info(f"fs_gmfl: expname '{name}' (FederatedScope's default would nest the output directory along "
                        "the model and data paths)")
    restore, outdir = plain(lookup(cfg, "federate.restore_from")), str(plain(lookup(cfg, "outdir")))
    run_dir = Path(outdir) / str(plain(lookup(cfg, "expname")))
    if restore and plain(lookup(cfg, "expname")) and run_dir.is_dir():
        logger.warning(f"fs_gmfl: {run_dir} exists: FederatedScope writes this restored run into "
                       f"{run_dir}/sub_exp_<time>/, whose summary.json lists the rounds after the restore only (the "
                       "earlier ones are in the first run's summary.json); set another expname to choose the directory")


def _last_component(value: str) -> str:
    """``/models/llama-7b@huggingface_llm`` -> ``llama-7b@huggingface_llm``."""
    head, at, hub = value.rpartition("@")
    path = head if at else value
    return Path(path.rstrip(os.sep)).name + (at + hub if at else "")


# -- command-line overrides ------------------------------------------------------------------------
@dataclasses.dataclass
class CommandLine:
    """The ``--cfg`` file and ``KEY VALUE`` overrides of the running FederatedScope entry point."""

    cfg_file: str | None
    opts: list[str]
    applied: bool = False

    @property
    def keys(self) -> list[str]:
        """The overridden keys, in order."""
        return [str(k) for k in self.opts[0::2]]


_COMMAND_LINE: CommandLine | None = None


def set_command_line(cfg_file: str | None, opts: list[str] | None) -> None:
    """Tell :func:`check_cfg` the launcher's ``--cfg`` file and overrides (``None`` clears them)."""
    global _COMMAND_LINE
    _COMMAND_LINE = None if cfg_file is None and opts is None else CommandLine(cfg_file, list(opts or []))


def command_line(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(--cfg file, global KEY VALUE overrides)`` of a FederatedScope command line, parsed as its main does
    (``client_<i>.KEY`` overrides, which go to ``--client_cfg``, are left out)."""
    import argparse

    from federatedscope.core.cmd_args import parse_client_cfg

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--cfg", dest="cfg_file", default=None)
    parser.add_argument("--client_cfg", default=None)
    parser.add_argument("--local_rank", default=None)
    parser.add_argument("--help", nargs="?", default="")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit:  # FederatedScope's own parser reports it
        return None, []
    opts, _ = parse_client_cfg(list(args.opts or []))
    return args.cfg_file, list(opts)


def _command_line() -> CommandLine | None:
    """The launcher's command line or, under FederatedScope's own main (plug-in entry point), ``sys.argv``'s."""
    global _COMMAND_LINE
    if _COMMAND_LINE is None and "--cfg" in sys.argv[1:] and Path(sys.argv[0]).name == "main.py":
        _COMMAND_LINE = CommandLine(*command_line(sys.argv[1:]))
    return _COMMAND_LINE


def _effective_view(cfg: Any) -> tuple[Any, bool]:
    """``(config to check, overrides still pending)``: ``cfg`` itself once the overrides are merged.

    Overrides count as merged as soon as ``cfg`` holds every overridden
    value; until then a copy with them merged (no checks) is checked.
    """
    line = _command_line()
    if line is None or line.applied or not line.opts or not hasattr(cfg, "clone"):
        return cfg, False
    try:
        view = cfg.clone()
        view.merge_from_list(list(line.opts), check_cfg=False)
    except Exception:  # noqa: BLE001 - a bad override is reported by FederatedScope's own merge
        return cfg, False
    if all(plain(lookup(view, key)) == plain(lookup(cfg, key)) for key in line.keys):
        line.applied = True
        return cfg, False
    return view, True


def _with_source(err: ConfigError) -> ConfigError:
    """``err`` with where its value came from: the command line, the ``--cfg`` file or a default."""
    line = _command_line()
    if line is None or err.unknown:
        return err
    return ConfigError(err.key, err.value, f"{err.allowed} [value from {_source_of(err.key, line)}]")


def _source_of(key: str, line: CommandLine) -> str:
    base = key.split("[")[0]
    if any(k == base or base.startswith(k + ".") for k in line.keys):
        return "the command line"
    if line.cfg_file and _file_sets(line.cfg_file, base):
        return f"the file {line.cfg_file}"
    return "a default (neither the file nor the command line sets it)"


def _file_sets(path: str, key: str) -> bool:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            node: Any = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return False
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


#: FederatedScope features an fs_gmfl run cannot use: (key, allowed values, why).
UNSUPPORTED: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("asyn.use", (False,), "synchronous rounds"),
    ("federate.use_ss", (False,), "no secret sharing (payloads are fs_gmfl messages)"),
    ("federate.online_aggr", (False,), "no online aggregation"),
    ("federate.process_num", (0, 1), "one process per participant (no multi-GPU standalone runner)"),
    ("quantization.method", ("none",), "no FederatedScope quantization (methods compress their own payloads)"),
    ("aggregator.robust_rule", ("fedavg",), "the method's own aggregation"),
    ("model.model_num_per_trainer", (1,), "one model per trainer"),
    ("personalization.local_param", ([],), "no FederatedScope parameter filter (methods decide what is sent)"),
    ("eval.monitoring", ([],), "no FederatedScope model monitoring (it reads state dicts, not fs_gmfl payloads)"),
    ("llm.deepspeed.use", (False,), "no DeepSpeed (the adapter rebuilds the optimizer over the trained tensors)"),
    ("faults.dropout_before", (0, 0.0), "no simulated faults (faults.* are embedded-simulator settings)"),
    ("faults.dropout_after", (0, 0.0), "no simulated faults (faults.* are embedded-simulator settings)"),
    ("faults.straggler_fraction", (0, 0.0), "no simulated faults (faults.* are embedded-simulator settings)"),
    ("faults.nan_clients", ([],), "no simulated faults (faults.* are embedded-simulator settings)"),
)


def _check_distributed(cfg: Any) -> None:
    """What a distributed (gRPC) fs_gmfl run needs beyond a standalone one."""
    if plain(lookup(cfg, "federate.share_local_model")):
        raise ConfigError("federate.share_local_model", True, "False in distributed mode (each process holds its "
                          "own model; FederatedScope's DistributedRunner cannot share one)")
    if _enabled(cfg, "gmfl") and plain(lookup(cfg, "gmfl.downlink")) == "stateful_sync":
        raise ConfigError("gmfl.downlink", "stateful_sync", "'stateless' in distributed mode: a client that misses a "
                          "downlink or restarts would keep a stale cache of the adapter")
    min_replies, clients = plain(lookup(cfg, "fault_tolerance.min_replies")), plain(lookup(cfg, "federate.client_num"))
    if isinstance(min_replies, int) and isinstance(clients, int) and clients > 0 and min_replies > clients:
        raise ConfigError("fault_tolerance.min_replies", min_replies, f"at most federate.client_num ({clients})")


def _check_supported(cfg: Any) -> None:
    method = str(plain(lookup(cfg, "federate.method"))).lower()
    half = plain(lookup(cfg, "train.is_enable_half"))
    spec = spec_of(method)
    if spec.trains_backbone and half not in (False, _MISSING):
        raise ConfigError("train.is_enable_half", half, f"False for federate.method '{method}' under FederatedScope: "
                          "it trains backbone weights, and FederatedScope's half precision would cast the whole "
                          "model, the server's master weights included, to float16")
    restore = plain(lookup(cfg, "federate.restore_from"))
    if restore and _enabled(cfg, "gmfl") and plain(lookup(cfg, "gmfl.downlink")) == "stateful_sync":
        raise ConfigError("gmfl.downlink", "stateful_sync", "'stateless' with federate.restore_from: the clients' "
                          "caches of a stateful downlink are not in FederatedScope's checkpoints")
    method_check = spec.host_config_check()
    if method_check is not None:
        method_check(lambda key: None if (value := plain(lookup(cfg, key))) is _MISSING else value)
    trainer = plain(lookup(cfg, "trainer.type"))
    if trainer != TRAINER_TYPE:
        raise ConfigError("trainer.type", trainer, f"'{TRAINER_TYPE}' (or FederatedScope's '{FS_LLM_TRAINER}', "
                          f"which fs_gmfl replaces by it) for federate.method '{method}'")
    for key, allowed, why in UNSUPPORTED:
        value = plain(lookup(cfg, key))
        if value is not _MISSING and value not in allowed:
            raise ConfigError(key, value, f"{' or '.join(map(repr, allowed))}: fs_gmfl runs need {why}")
    if plain(lookup(cfg, "federate.mode")) == "distributed":
        _check_distributed(cfg)
    data_type, model_type = str(plain(lookup(cfg, "data.type"))), str(plain(lookup(cfg, "model.type")))
    if is_sim_data(data_type) != is_sim_model(model_type):
        raise ConfigError("model.type", model_type, f"'<backbone>@{MODEL_HUB}' together with an fs_gmfl "
                          f"dataset ({', '.join([*READERS, 'synthetic', 'csv:<path>', 'jsonl:<path>'])}), or a "
                          f"FederatedScope model ('<name>@huggingface_llm') with FederatedScope data "
                          f"(data.type is '{data_type}')")
    if is_sim_data(data_type):
        for key, allowed in (("grad.grad_accum_count", 1), ("dataloader.drop_last", False)):
            value = plain(lookup(cfg, key))
            if value not in (_MISSING, allowed):
                raise ConfigError(key, value, f"{allowed!r} with an fs_gmfl dataset (it plays the simulator's "
                                  "batch schedule)")

