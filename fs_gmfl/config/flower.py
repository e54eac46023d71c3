"""The ``flower:`` YAML subtree: what the Flower host needs beyond the run itself.

Read only by the Flower host (:mod:`fs_gmfl.hosts.flower`): ``fs-gmfl
flower-run`` (Flower's simulation engine, one virtual client per
``federate.client_num``), ``flwr run`` of a generated app, and a deployment of
SuperLink + SuperNodes. The other hosts ignore it. None of these values comes
from a paper: they are operational choices of fs_gmfl (``inferred``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fs_gmfl.config.fields import opt

ARRIVAL = "arrival"
CLIENT_ID = "client_id"


@dataclass
class FlowerConfig:
    """Resources, parallelism and deadlines of a Flower run."""

    max_parallel: int = opt(
        0, "Virtual clients trained at the same time by Flower's simulation engine (one Ray actor each); 0: as many "
        "as the machine's CPU cores allow at client_cpus each. 1 trains them one after another.", ge=0,
        inferred=True)
    client_cpus: float = opt(
        1.0, "CPU cores Flower's simulation engine reserves per virtual client (Ray's num_cpus).", gt=0.0,
        inferred=True)
    client_gpus: float = opt(
        0.0, "GPUs reserved per virtual client (Ray's num_gpus; a fraction shares one GPU). 0 on a CPU machine.",
        ge=0.0, inferred=True)
    client_threads: int = opt(
        0, "torch threads of each client's training; 0: the CPU cores divided by the clients running at once "
        "(at least 1).", ge=0, inferred=True)
    fold_order: str = opt(
        ARRIVAL, "Order in which a round's replies are folded into the global state: 'arrival' (each as it arrives, "
        "the server holds one uplink at a time) or 'client_id' (replies that overtake a smaller client id wait for "
        "it: the same order, hence the same bits, as the embedded simulator, whatever the parallelism).",
        choices=(ARRIVAL, CLIENT_ID), inferred=True)
    round_timeout_s: float = opt(
        1800.0, "Seconds the server waits for a round's replies; a node that has not replied by then is lost for "
        "the round (logged, listed in summary.json) and the replies that arrived are aggregated.", gt=0.0,
        inferred=True)
    node_wait_s: float = opt(
        600.0, "Seconds the server waits at the start for the nodes of every partition (federate.client_num) to "
        "connect and say which partition they hold (a node's first client process imports torch and may take a "
        "minute on a loaded machine); it then starts with those that did (at least one, else exit 1). Nodes may "
        "connect later.",
        gt=0.0, inferred=True)
    ray_temp_dir: str = opt(
        "", "Directory for Ray's session files in fs-gmfl flower-run ('' : Ray's default under the system temp "
        "directory).", inferred=True)

    def parallel_clients(self, client_num: int) -> int:
        """How many virtual clients train at once: ``max_parallel`` or what the cores allow, at most ``client_num``."""
        cores = os.cpu_count() or 1
        wanted = self.max_parallel or max(1, int(cores // self.client_cpus))
        return max(1, min(wanted, client_num))

    def threads_per_client(self, client_num: int) -> int:
        """torch threads of one client's training."""
        if self.client_threads:
            return self.client_threads
        return max(1, (os.cpu_count() or 1) // self.parallel_clients(client_num))
