"""Run directories of the embedded simulator: one run at a time, nothing finished overwritten, valid outputs.

``<outdir>/<expname>/`` belongs to one run while it runs:

* :class:`RunDirectory` checks before anything is loaded that ``outdir`` is a
  directory (or can be created) and writable, then takes an exclusive
  ``fcntl.flock`` on ``<run_dir>/.lock``; a second run on the same directory
  is refused with one line naming the holder's process id. The lock dies with
  the process, so a killed run never leaves a stale lock behind.
* A directory that holds a finished run (``summary.json``) is never
  overwritten silently: a new run there is refused with one line naming
  ``--overwrite`` (which removes the old ``summary.json``, plot and
  communication log once the new run has loaded its data and model, so a
  refused configuration loses nothing) and ``--resume`` (which continues it).
* :func:`write_text_atomic` / :func:`write_json_atomic` write a temporary file
  and rename it over the target, so a reader never sees half a file; JSON is
  strict (:func:`json_safe` turns NaN and infinities into ``null``, so no
  ``NaN``/``Infinity`` tokens appear).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from fs_gmfl.errors import InputError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
SUMMARY = "summary.json"
#: outputs removed by ``--overwrite`` before the new run starts (the others are rewritten from scratch).
FINISHED_OUTPUTS = ("summary.json", "curves.png", "comm_log.jsonl")


def json_safe(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by ``None`` (JSON ``null``); tuples become lists."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def dumps_strict(data: Any, **kwargs: Any) -> str:
    """Strict JSON of ``data`` (non-finite numbers as ``null``; numpy/torch scalars through ``float``)."""
    return json.dumps(json_safe(data), allow_nan=False, default=_number, **kwargs)


def _number(value: Any) -> Any:
    number = float(value)
    return number if math.isfinite(number) else None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write strict JSON (see :func:`dumps_strict`) atomically."""
    write_text_atomic(path, dumps_strict(data, indent=2))


class RunDirectory:
    """Exclusive use of ``run_dir`` for one run (a context manager).

    Args:
        run_dir: ``<outdir>/<run name>``.
        resume: the run continues the directory's checkpoint (a finished run may be resumed).
        overwrite: a finished run there may be replaced.
    """

    def __init__(self, run_dir: Path, *, resume: bool = False, overwrite: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.overwrite = overwrite
        self._handle: IO[str] | None = None
        self._created = False

    @property
    def finished(self) -> bool:
        """The directory holds the ``summary.json`` of a finished run."""
        return (self.run_dir / SUMMARY).exists()

    def __enter__(self) -> RunDirectory:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Create and check the directory, lock it, and apply the finished-run rule.

        Raises:
            InputError: ``outdir`` or the run directory is not a usable
                directory, another process holds the lock, or a finished run
                would be overwritten without ``--overwrite``.
        """
        self._make_directory()
        self._lock()
        try:
            self._check_finished()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Drop the lock; a run directory this run created and left empty (it failed early) is removed again.

        Otherwise the lock file stays: removing it could let two runs lock different files.
        """
        if self._handle is None:
            return
        if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def clear_finished(self) -> None:
        """With ``--overwrite``, remove the finished run's outputs; called once the new run has set up."""
        if self.finished and self.overwrite and not self.resume:
            for name in FINISHED_OUTPUTS:
                (self.run_dir / name).unlink(missing_ok=True)
            logger.warning("replacing the finished run in %s (--overwrite)", self.run_dir)

    def _make_directory(self) -> None:
        outdir = self.run_dir.parent
        for path, what in ((outdir, "outdir"), (self.run_dir, "run directory")):
            if path.exists() and not path.is_dir():
                raise InputError(f"{what} '{path}' exists and is not a directory; choose another outdir/expname")
        self._created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"cannot create the run directory '{self.run_dir}' (outdir '{outdir}'): "
                             f"{err.strerror or err}") from None
        if not os.access(self.run_dir, os.W_OK | os.X_OK):
            raise InputError(f"run directory '{self.run_dir}' is not writable; choose another outdir")

    def _lock(self) -> None:
        path = self.run_dir / LOCK_FILE
        try:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        except OSError as err:
            raise InputError(f"run directory '{self.run_dir}' is not writable: {err.strerror or err}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise InputError(f"run directory '{self.run_dir}' is in use by another run (pid {holder}); wait "
                                 "for it to end or choose another expname") from None
            raise InputError(f"cannot lock the run directory '{self.run_dir}': {err.strerror or err}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def _check_finished(self) -> None:
        if not self.finished or self.resume:
            return
        if not self.overwrite:
            raise InputError(f"run directory '{self.run_dir}' already holds a finished run (summary.json); pass "
                             "--overwrite to replace it, --resume to continue it, or choose another expname")


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
