"""The ``faults:`` YAML subtree: simulated client dropout and stragglers (read by the embedded simulator).

The configuration lives here, with the other validated sections; the draw of
each client's fate is :mod:`fs_gmfl.hosts.sim.faults`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fs_gmfl.config.fields import fail, opt


@dataclass
class FaultsConfig:
    """Client dropout and stragglers with a deadline (embedded simulator only)."""

    dropout_before: float = opt(0.0, "Probability that a sampled client drops out after receiving its downlink "
                                "and before training (it never replies).", ge=0.0, le=1.0)
    dropout_after: float = opt(0.0, "Probability that a client that trained loses its uplink (the server never "
                               "receives it).", ge=0.0, le=1.0)
    straggler_fraction: float = opt(0.0, "Probability that a replying client is a straggler.", ge=0.0, le=1.0)
    straggler_delay: float = opt(0.0, "A straggler's extra simulated seconds are uniform in [0, this).", ge=0.0)
    client_seconds: float = opt(1.0, "Simulated seconds every client needs to train and reply.", gt=0.0)
    deadline: float = opt(0.0, "Simulated seconds after which the server closes a round and ignores later "
                          "replies; 0 waits for every reply.", ge=0.0)
    nan_clients: list[int] = opt(factory=list, help="Ids of broken or hostile clients: every uplink they send has "
                                 "NaN in each floating-point entry, which the server's uplink check rejects "
                                 "(with federate.max_rejected_rounds, a run where only they reply stops).", ge=0)

    def __post_init__(self) -> None:
        if 0.0 < self.deadline < self.client_seconds:
            fail(self, "deadline", self.deadline, f"0 (no deadline) or at least faults.client_seconds "
                 f"({self.client_seconds}); every client would miss it")
        if self.straggler_fraction > 0 and self.straggler_delay == 0:
            fail(self, "straggler_delay", self.straggler_delay, "a number > 0 when faults.straggler_fraction > 0 "
                 "(a straggler without delay is an ordinary client)")

    def check_clients(self, client_num: int) -> None:
        """``nan_clients`` must name clients of the run.

        Raises:
            ConfigError: an id is not below ``federate.client_num``.
        """
        outside = [c for c in self.nan_clients if c >= client_num]
        if outside:
            fail(self, "nan_clients", self.nan_clients, f"client ids in [0, {client_num - 1}] (federate.client_num = "
                 f"{client_num})")

    @property
    def active(self) -> bool:
        """Whether any fault can happen."""
        return self.dropout_before > 0 or self.dropout_after > 0 or self.straggler_fraction > 0
