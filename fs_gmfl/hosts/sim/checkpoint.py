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
from collections.abc import Mapping
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
RESUMABLE_CHANGES = ("federate.total_round_num", "federate.save_freq", "outdir")


# -- configuration identity ----------------------------------------------------------------------
def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved configuration as ``{dotted key: value}``."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}")
        else:
            out[prefix.rstrip(".")] = node

    walk(to_dict(cfg), "")
    return out


def identity(cfg: RunConfig) -> dict[str, Any]:
    """The keys that must match between a checkpoint and the run resuming it."""
    return {k: v for k, v in flat_config(cfg).items() if k not in RESUMABLE_CHANGES}


def config_hash(ident: Mapping[str, Any]) -> str:
    """SHA-256 of :func:`identity` in canonical JSON."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


# -- save / load ---------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A loaded checkpoint: the manifest, the strategy state and where the client state lies."""

    directory: Path
    manifest: dict[str, Any]
    server_state: Any

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


def load_checkpoint(run_dir: Path, cfg: RunConfig, method: str) -> Checkpoint:
    """Read and verify the latest checkpoint of ``run_dir`` for ``cfg``.

    Raises:
        InputError: no checkpoint, or it is corrupt (unreadable manifest, checksum mismatch, bad tensors).
        ConfigError: the checkpoint was written by a run with a different configuration (names the key).
    """
    directory = latest_checkpoint_dir(run_dir)
    if directory is None:
        raise InputError(f"no checkpoint to resume from in {run_dir / CHECKPOINT_DIR} "
                         "(set federate.save_freq > 0 to write one)")
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"format is not {FORMAT_VERSION}")
        checksum, tree, rnd = manifest["state_sha256"], manifest["strategy_tree"], int(manifest["round"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"corrupt checkpoint {directory / MANIFEST}: {err}") from None
    ident = identity(cfg)
    if manifest.get("config_hash") != config_hash(ident):
        saved = manifest.get("config", {})
        for key in sorted(set(ident) | set(saved)):
            if ident.get(key) != saved.get(key):
                raise ConfigError(key, ident.get(key), f"{saved.get(key)!r} as in the checkpoint of round {rnd} "
                                  f"in {directory} (resume with the same configuration, or use another outdir)")
        raise InputError(f"corrupt checkpoint {directory / MANIFEST}: configuration hash does not match its "
                         "configuration")
    if manifest.get("method") != method:
        raise ConfigError("federate.method", method, f"{manifest.get('method')!r} as in the checkpoint")
    state_path = directory / STATE_FILE
    try:
        if file_sha256(state_path) != checksum:
            raise ValueError("SHA-256 does not match the manifest (truncated or modified)")
        tensors = load_file(str(state_path))
        server_state = unflatten_state(tree, tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise InputError(f"corrupt checkpoint {state_path}: {err}") from None
    return Checkpoint(directory, manifest, server_state)


def restore_rng(manifest: Mapping[str, Any]) -> None:
    """Restore torch's global RNG state saved in ``manifest``."""
    torch.set_rng_state(torch.tensor(manifest["torch_rng"], dtype=torch.uint8))
