"""Checkpoints of simulator runs: save after a round, resume bit for bit.

A checkpoint is ``<run_dir>/checkpoint/round_<k>/`` holding

* ``state.safetensors``: every tensor of the server strategy's state (global
  adapter, masks, importance EMAs, cluster heads and memberships, subspace
  logs, ...) under flat keys;
* ``manifest.json``: the round, the method, the resolved configuration and
  its hash, the non-tensor strategy state (with the tree structure that puts
  the tensors back in place), the run's records so far (``per_round``,
  evaluation lines, communication ledger, fault and rejection counts), torch's
  RNG state and the SHA-256 of ``state.safetensors``;
* ``client_state/``: a copy of the per-client state store.

Loading verifies everything before anything is used or changed: every field
the manifest must hold (the simulator's run records included), the
configuration, the checksum of the tensors, and that the saved RNG state is
one torch accepts. A damaged checkpoint is refused with one line naming the
file and what is wrong, and left exactly as it was.

``checkpoint/LATEST`` names the newest complete round directory and is
replaced atomically (``os.replace``) only after that directory is fully
written, so a run killed at any moment leaves the previous checkpoint usable.
Every random choice of the simulator derives from ``(seed, purpose, round,
client)``, so the round counter plus the saved state determine the rest of
the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fs_gmfl.config.fields import to_dict
from fs_gmfl.config.schema import RunConfig
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.common.rundir import file_sha256
from fs_gmfl.hosts.common.state_tree import flatten_state, unflatten_state

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoint"
LATEST = "LATEST"
MANIFEST = "manifest.json"
STATE_FILE = "state.safetensors"
CLIENT_STATE = "client_state"
#: configuration keys a resumed run may change: they do not alter rounds already run.
RESUMABLE_CHANGES = ("federate.total_round_num", "federate.save_freq", "federate.max_rejected_rounds", "outdir")
#: fields :func:`save_checkpoint` writes into every manifest (the run's records come on top).
MANIFEST_FIELDS = ("format", "round", "method", "config_hash", "config", "state_sha256", "strategy_tree", "torch_rng")
#: ``parse(value) -> parsed``: how a host reads one of its run records back (raises on a malformed value).
RecordParser = Callable[[Any], Any]


# -- configuration identity ----------------------------------------------------------------------
def flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """A nested mapping as ``{dotted key: value}``."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}")
        else:
            out[prefix.rstrip(".")] = node

    walk(data, "")
    return out


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved configuration as ``{dotted key: value}``."""
    return flatten(to_dict(cfg))


def identity(cfg: RunConfig) -> dict[str, Any]:
    """The keys that must match between a checkpoint and the run resuming it."""
    return identity_of(flat_config(cfg))


def identity_of(flat: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`identity` of a flat configuration (``config.yaml`` read back, a manifest's ``config``)."""
    return {k: v for k, v in flat.items() if k not in RESUMABLE_CHANGES}


def refuse_changed_config(ident: Mapping[str, Any], saved: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ConfigError` for the first key whose value differs from ``saved`` (written by ``where``)."""
    for key in sorted(set(ident) | set(saved)):
        if ident.get(key) != saved.get(key):
            raise ConfigError(key, ident.get(key), f"{saved.get(key)!r} as in {where} (resume with the same "
                              "configuration, or use another outdir)")


def config_hash(ident: Mapping[str, Any]) -> str:
    """SHA-256 of :func:`identity` in canonical JSON."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


# -- save / load ---------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A loaded, verified checkpoint: the manifest, the strategy state, the RNG state, the parsed run records
    and where the client state lies."""

    directory: Path
    manifest: dict[str, Any]
    server_state: Any
    rng_state: torch.Tensor
    records: dict[str, Any]

    @property
    def round(self) -> int:
        """The last completed round."""
        return int(self.manifest["round"])

    @property
    def client_state_dir(self) -> Path:
        """The saved per-client state."""
        return self.directory / CLIENT_STATE


def save_checkpoint(run_dir: Path, cfg: RunConfig, *, rnd: int, method: str, server_state: Any,
                    records: Mapping[str, Any], client_state_dir: Path) -> Path:
    """Write the checkpoint of round ``rnd`` and make it the latest one atomically; return its directory."""
    root = run_dir / CHECKPOINT_DIR
    final = root / f"round_{rnd:06d}"
    copies = 1
    while final.exists():  # never overwrite a directory LATEST may name (an earlier run's round rnd)
        copies += 1
        final = root / f"round_{rnd:06d}-{copies}"
    tmp = root / f".round_{rnd:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tree, tensors = flatten_state(server_state)
    save_file(tensors, str(tmp / STATE_FILE))
    if client_state_dir.exists():
        shutil.copytree(client_state_dir, tmp / CLIENT_STATE)
    ident = identity(cfg)
    manifest = {"format": FORMAT_VERSION, "round": rnd, "method": method, "config_hash": config_hash(ident),
                "config": ident, "state_sha256": file_sha256(tmp / STATE_FILE), "strategy_tree": tree,
                "torch_rng": torch.get_rng_state().tolist(), **records}
    with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, default=float)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(final)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(final.name, encoding="utf-8")
    pointer.replace(root / LATEST)
    for old in [*root.glob("round_*"), *root.glob(".round_*.tmp")]:  # older rounds, half-written leftovers
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint_dir(run_dir: Path) -> Path | None:
    """The directory ``checkpoint/LATEST`` names, or None when the run has no checkpoint."""
    pointer = run_dir / CHECKPOINT_DIR / LATEST
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"corrupt checkpoint pointer {pointer}: {err}") from None
    if not re.fullmatch(r"round_\d{6,}(-\d+)?", name):  # never a path outside the checkpoint directory
        raise InputError(f"corrupt checkpoint pointer {pointer}: {name[:80]!r} is not a round directory name")
    return run_dir / CHECKPOINT_DIR / name


def load_checkpoint(run_dir: Path, cfg: RunConfig, method: str,
                    records: Mapping[str, RecordParser] | None = None) -> Checkpoint:
    """Read and verify the latest checkpoint of ``run_dir`` for ``cfg``; nothing is changed.

    Args:
        run_dir: the run directory.
        cfg: the configuration of the run resuming it.
        method: the strategy's name.
        records: the run records the manifest must hold, each with its parser;
            :attr:`Checkpoint.records` holds what they return.

    Raises:
        InputError: no checkpoint, or it is corrupt (unreadable manifest, a
            missing or malformed field, an RNG state torch refuses, checksum
            mismatch, bad tensors); the message names the file.
        ConfigError: the checkpoint was written by a run with a different configuration (names the key).
    """
    directory = latest_checkpoint_dir(run_dir)
    if directory is None:
        raise InputError(f"no checkpoint to resume from in {run_dir / CHECKPOINT_DIR} "
                         "(set federate.save_freq > 0 to write one)")
    records = records or {}
    path = directory / MANIFEST
    manifest = read_manifest(directory, (*MANIFEST_FIELDS, *records))
    rnd = manifest["round"]
    ident = identity(cfg)
    if manifest["config_hash"] != config_hash(ident):
        refuse_changed_config(ident, manifest["config"], f"the checkpoint of round {rnd} in {directory}")
        raise InputError(f"corrupt checkpoint {path}: configuration hash does not match its configuration")
    if manifest["method"] != method:
        raise ConfigError("federate.method", method, f"{manifest['method']!r} as in the checkpoint")
    rng_state = parse_rng_state(manifest["torch_rng"], path)
    parsed = {name: _parse_field(manifest, name, parse, path) for name, parse in records.items()}
    return Checkpoint(directory, manifest, _load_state(directory, manifest), rng_state, parsed)


def read_records(run_dir: Path, records: Mapping[str, RecordParser], *, at_round: int) -> dict[str, Any] | None:
    """The parsed ``records`` of the latest checkpoint when it is of round ``at_round`` (else ``None``).

    Raises:
        InputError: the checkpoint's manifest is corrupt or a record is missing or malformed.
    """
    directory = latest_checkpoint_dir(run_dir)
    if directory is None:
        return None
    manifest = read_manifest(directory, (*MANIFEST_FIELDS, *records))
    if manifest["round"] != at_round:
        return None
    return {name: _parse_field(manifest, name, parse, directory / MANIFEST) for name, parse in records.items()}


def read_manifest(directory: Path, required: tuple[str, ...] = MANIFEST_FIELDS) -> dict[str, Any]:
    """The manifest of a checkpoint directory, holding every field of ``required``.

    Raises:
        InputError: the manifest is unreadable, not a JSON object of this
            format, or lacks a field (names the file and the fields).
    """
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"corrupt checkpoint {path}: {err}") from None
    if not isinstance(manifest, dict):
        raise InputError(f"corrupt checkpoint {path}: not a JSON object")
    missing = [name for name in required if name not in manifest]
    if missing:
        raise InputError(f"corrupt checkpoint {path}: field{'s' * (len(missing) > 1)} {', '.join(missing)} "
                         "missing (every checkpoint has them; the file was cut or edited)")
    if manifest["format"] != FORMAT_VERSION:
        raise InputError(f"corrupt checkpoint {path}: format is {manifest['format']!r}, not {FORMAT_VERSION}")
    _parse_field(manifest, "round", _round_number, path)
    _parse_field(manifest, "config", _mapping, path)
    return manifest


def _round_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a round number")
    return value


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"a {type(value).__name__}, not a mapping")
    return value


def _parse_field(manifest: Mapping[str, Any], name: str, parse: RecordParser, path: Path) -> Any:
    """``parse(manifest[name])``, any failure reported as a corrupt field of ``path``."""
    try:
        return parse(manifest[name])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise InputError(f"corrupt checkpoint {path}: field '{name}' is malformed ({type(err).__name__}: "
                         f"{str(err)[:200]})") from None


def parse_rng_state(value: Any, path: Path) -> torch.Tensor:
    """The saved torch RNG state as a tensor, verified by setting it (and putting the current one back).

    Raises:
        InputError: not a list of bytes of the right length, or a state torch refuses.
    """
    current = torch.get_rng_state()
    if not isinstance(value, list) or len(value) != current.numel() \
            or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in value):
        raise InputError(f"corrupt checkpoint {path}: field 'torch_rng' is not torch's RNG state ({current.numel()} "
                         "bytes)")
    state = torch.tensor(value, dtype=torch.uint8)
    try:
        torch.set_rng_state(state)
    except RuntimeError as err:
        raise InputError(f"corrupt checkpoint {path}: field 'torch_rng' is not a valid RNG state ({err})") from None
    finally:
        torch.set_rng_state(current)
    return state


def _load_state(directory: Path, manifest: Mapping[str, Any]) -> Any:
    """The strategy state from ``state.safetensors``, after its checksum matched the manifest's."""
    state_path = directory / STATE_FILE
    try:
        if file_sha256(state_path) != manifest["state_sha256"]:
            raise ValueError("SHA-256 does not match the manifest (truncated or modified)")
        return unflatten_state(manifest["strategy_tree"], load_file(str(state_path)))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise InputError(f"corrupt checkpoint {state_path}: {err}") from None


def restore_rng(ckpt: Checkpoint) -> None:
    """Restore torch's global RNG state saved in ``ckpt``."""
    torch.set_rng_state(ckpt.rng_state)
