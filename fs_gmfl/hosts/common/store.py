"""Per-client persistent state for the simulator, kept on disk.

Clients of stateful methods (a cached adapter, a mask, a log position) keep
state between rounds. Holding every client's state in memory would make
memory grow with the number of clients, so the store keeps at most one
client's state in memory and writes it to ``<dir>/<client>.pt`` between
visits. Stateless methods never write anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class ClientStateStore:
    """Disk-backed mapping ``client id -> dict`` with one client open at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, client_id: int) -> Path:
        return self.directory / f"client_{client_id}.pt"

    @contextlib.contextmanager
    def open(self, client_id: int) -> Iterator[dict[str, Any]]:
        """Load the client's state (empty at first), yield it, and save it if it is not empty."""
        path = self._path(client_id)
        state: dict[str, Any] = torch.load(path, weights_only=True) if path.exists() else {}
        yield state
        if state:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(path)

    def clients(self) -> list[int]:
        """Ids of clients with saved state."""
        return sorted(int(p.stem.split("_")[1]) for p in self.directory.glob("client_*.pt"))
