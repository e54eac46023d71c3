"""The ``fault_tolerance:`` YAML subtree: deadlines of a distributed (multi-process) run.

A distributed run must never hang on a participant that died, restarted or
is late: every wait has a deadline, and what happens at the deadline is
set here. Read by the FederatedScope host in ``federate.mode: distributed``
(:mod:`fs_gmfl.hosts.fs.resilience`); the embedded simulator runs in one
process and simulates faults with ``faults.*`` instead.

None of these values comes from a paper: they are operational choices of
fs_gmfl (``inferred``), sized for LLM rounds of seconds to tens of minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fs_gmfl.config.fields import fail, opt


@dataclass
class FaultToleranceConfig:
    """Deadlines and quorum of a distributed run (FederatedScope gRPC mode)."""

    round_timeout_s: float = opt(
        1800.0, "Seconds the server waits for a round's replies (and for the clients' evaluation results) after "
        "sending the downlinks; then it aggregates the replies that arrived if at least min_replies did, logs the "
        "clients it lost and goes on, otherwise it saves a checkpoint and stops (exit 1).", gt=0.0, inferred=True)
    min_replies: int = opt(
        1, "Fewest replies a round may be aggregated with when clients were lost or missed round_timeout_s.",
        ge=1, inferred=True)
    join_timeout_s: float = opt(
        600.0, "Seconds the server waits for all federate.client_num clients to join before it starts with those "
        "that did (at least min_replies, else exit 1); also how long a client retries its join, with back-off, "
        "before it gives up (exit 1). So the processes may start in any order.", gt=0.0, inferred=True)
    heartbeat_s: float = opt(
        5.0, "Seconds between a client's heartbeats to the server (a repeated join; it also makes a restarted "
        "server know the clients still running).", gt=0.0, inferred=True)
    client_timeout_s: float = opt(
        30.0, "A sampled client from which the server has heard nothing (no reply, no heartbeat) for this long is "
        "lost for the round: the round does not wait for it.", gt=0.0, inferred=True)
    server_timeout_s: float = opt(
        600.0, "A client whose server has been unreachable for this long stops (exit 1); a server restarted within "
        "it (federate.restore_from) is rejoined by the running clients.", gt=0.0, inferred=True)
    rpc_timeout_s: float = opt(
        120.0, "Deadline of one gRPC call (a message to one participant); a call past it counts as failed.",
        gt=0.0, inferred=True)

    def __post_init__(self) -> None:
        if self.client_timeout_s <= 2 * self.heartbeat_s:
            fail(self, "client_timeout_s", self.client_timeout_s, f"more than twice fault_tolerance.heartbeat_s "
                 f"({self.heartbeat_s}); a live client would be counted lost between two heartbeats")
        if self.server_timeout_s <= 2 * self.heartbeat_s:
            fail(self, "server_timeout_s", self.server_timeout_s, f"more than twice fault_tolerance.heartbeat_s "
                 f"({self.heartbeat_s}); a client would give up between two heartbeats")
