"""Exact communication accounting from the messages actually exchanged.

Every downlink and uplink :class:`~fs_gmfl.core.message.Message` is recorded
with its client and round; bytes are ``numel * element_size`` of the tensors
in it (model payload and protocol control counted separately), so totals are
exact, per client, per direction and per round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fs_gmfl.core.message import Message

DIRECTIONS = ("uplink", "downlink")


@dataclass
class Transfer:
    """One message: its round, client, direction and byte counts."""

    round: int
    client_id: int
    direction: str
    payload_bytes: int
    control_bytes: int

    @property
    def nbytes(self) -> int:
        """Payload plus control bytes."""
        return self.payload_bytes + self.control_bytes

    def as_row(self) -> dict[str, int | str]:
        """JSON-ready form (one line of ``comm_log.jsonl``)."""
        return {"round": self.round, "client": self.client_id, "direction": self.direction,
                "payload_bytes": self.payload_bytes, "control_bytes": self.control_bytes, "bytes": self.nbytes}


def _sums(transfers: Iterable[Transfer]) -> dict[str, int]:
    out = {f"{d}_{part}": 0 for d in DIRECTIONS for part in ("bytes", "payload_bytes", "control_bytes")}
    for t in transfers:
        out[f"{t.direction}_bytes"] += t.nbytes
        out[f"{t.direction}_payload_bytes"] += t.payload_bytes
        out[f"{t.direction}_control_bytes"] += t.control_bytes
    return out


class CommLedger:
    """All transfers of a run, with per-round and total sums."""

    def __init__(self) -> None:
        self.transfers: list[Transfer] = []

    def record(self, rnd: int, client_id: int, direction: str, message: Message) -> Transfer:
        """Record one message and return its :class:`Transfer`."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        t = Transfer(rnd, client_id, direction, message.payload_bytes, message.control_bytes)
        self.transfers.append(t)
        return t

    def round_totals(self, rnd: int) -> dict[str, int]:
        """Byte sums of round ``rnd``: ``uplink_bytes``, ``downlink_bytes`` and their payload/control parts."""
        return _sums(t for t in self.transfers if t.round == rnd)

    def totals(self) -> dict[str, int]:
        """Byte sums over the whole run."""
        return _sums(self.transfers)

    def state_dict(self) -> list[dict[str, int | str]]:
        """All transfers as rows (for checkpoints)."""
        return [t.as_row() for t in self.transfers]

    def load_state_dict(self, rows: list[dict[str, int | str]]) -> None:
        """Restore :meth:`state_dict`."""
        self.transfers = [Transfer(int(r["round"]), int(r["client"]), str(r["direction"]), int(r["payload_bytes"]),
                                   int(r["control_bytes"])) for r in rows]
