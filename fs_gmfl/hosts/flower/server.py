"""The server side of the Flower host: the simulator's run loop with its clients behind a Flower ``Grid``.

:class:`FlowerRun` is the embedded simulator's :class:`~fs_gmfl.hosts.sim.runner.Simulation`
(sampling, the method's strategy, streaming aggregation, evaluation,
checkpoints, ``summary.json``/``eval_results.log``/``comm_log.jsonl``) whose
transport is a :class:`GridTransport`: each sampled client's downlink goes to
the node of its partition as a Flower ``train`` message, and the replies are
folded into the strategy as they arrive (``flower.fold_order``), each decoded
and checked (:mod:`fs_gmfl.hosts.flower.records`) and then screened by the
method's uplink gate, as in every host. Bytes are counted from the decoded
fs_gmfl messages, as in the other hosts.

Flower's own ``Strategy.start`` is not used: it waits for every reply of a
round (``send_and_receive``) before aggregating, and its node sampling waits
without a deadline for ``min_available_nodes``. Here a round waits at most
``flower.round_timeout_s``; a node that died, failed or stayed silent costs its
reply (logged, ``per_round[].lost_clients`` in ``summary.json``), and a node
that reconnects (a restarted SuperNode has a new node id) is found again by
its partition at the next round.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from flwr.app import Message as FlowerMessage

from fs_gmfl.config.flower import CLIENT_ID
from fs_gmfl.config.loader import config_to_yaml
from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.message import Message, Reply
from fs_gmfl.errors import ConfigError, RunStopped
from fs_gmfl.hosts.common.tensor_wire import WireError
from fs_gmfl.hosts.flower.client import (CFG_DIGEST, CFG_TEXT, CLIENT, ROUND, STEP_SECONDS, config_digest)
from fs_gmfl.hosts.flower.records import CONFIG, METRICS, message_content, message_of
from fs_gmfl.hosts.sim.runner import Simulation

logger = logging.getLogger(__name__)

#: seconds between two polls of the Grid for replies.
POLL_S = 0.05
#: longest absolute ``flower.ray_temp_dir``: Ray adds ~62 characters of session and socket names, unix sockets allow 107.
MAX_RAY_DIR = 40


class NodeDirectory:
    """Which Flower node holds which fs_gmfl client: node ids asked for their ``partition-id`` once each.

    Args:
        grid: the run's Grid.
        client_num: ``federate.client_num``; a node whose ``num-partitions``
            differs, or whose partition is out of range, is ignored (logged).
        on_replaced: called with the client id when a partition's node
            changes (a restarted SuperNode: what the old node held is gone).
    """

    def __init__(self, grid: Any, client_num: int, on_replaced: Callable[[int], None] | None = None,
                 prepare: dict[str, str] | None = None) -> None:
        self.grid = grid
        self.client_num = client_num
        self.on_replaced = on_replaced
        self.prepare = prepare or {}  # the run's configuration, sent with each query for the node to build from
        self.node_of: dict[int, int] = {}
        self.left: dict[int, int] = {}  # client id -> the node that held it and left the Grid
        self.asked: set[int] = set()
        self.pending: dict[str, int] = {}  # message id of an unanswered partition query -> node

    def refresh(self) -> None:
        """Forget nodes that left the Grid, ask new ones for their partition, register the answers that came.

        Never blocks: a node that has not answered yet (its client app is
        still starting) stays pending and is registered at a later refresh.
        """
        live = set(self.grid.get_node_ids())
        for cid, node in list(self.node_of.items()):
            if node not in live:
                self.left[cid] = self.node_of.pop(cid)
                logger.warning("flower: the node of client %d (node %d) left", cid, node)
        self.pending = {mid: node for mid, node in self.pending.items() if node in live}
        self.asked &= live
        new = sorted(live - self.asked)
        if new:
            self._ask(new)
        if self.pending:
            for reply in self.grid.pull_messages(list(self.pending)):
                node = self.pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    self._register(node, reply)

    def _ask(self, nodes: list[int]) -> None:
        messages = [FlowerMessage(RecordDict({CONFIG: ConfigRecord({"ask": "partition", **self.prepare})}),
                                  dst_node_id=node, message_type="query") for node in nodes]
        self.pending.update({mid: node for mid, node in zip(self.grid.push_messages(messages), nodes) if mid})
        self.asked.update(nodes)

    def _register(self, node: int, reply: FlowerMessage) -> None:
        if reply.has_error():
            logger.warning("flower: node %d could not say which partition it holds: %s", node, reply.error.reason)
            self.asked.discard(node)  # asked again at the next refresh
            return
        try:
            config = reply.content[CONFIG]
            pid, partitions = int(config["partition-id"]), int(config["num-partitions"])
        except (KeyError, TypeError, ValueError):
            logger.warning("flower: node %d answered the partition query with a malformed record; ignored", node)
            return
        if partitions != self.client_num or not 0 <= pid < self.client_num:
            logger.warning("flower: node %d holds partition %d of %d, but federate.client_num is %d; ignored", node,
                           pid, partitions, self.client_num)
            return
        previous = self.node_of.get(pid, self.left.pop(pid, None))
        self.node_of[pid] = node
        if previous is not None and previous != node:
            logger.warning("flower: client %d is now on node %d (was node %d)", pid, node, previous)
            if self.on_replaced is not None:
                self.on_replaced(pid)

    def wait_for_all(self, timeout: float) -> None:
        """Refresh until every partition has a node or ``timeout`` passed (then go on with those there are)."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if len(self.node_of) == self.client_num or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S * 4)
        missing = sorted(set(range(self.client_num)) - set(self.node_of))
        if len(missing) == self.client_num:
            raise RunStopped(f"no Flower node holding a partition of federate.client_num = {self.client_num} "
                             f"connected within flower.node_wait_s = {timeout:g} s")
        if missing:
            logger.warning("flower: starting without nodes for clients %s (they may connect later)", missing)


class GridTransport:
    """Sends each downlink to its client's node and yields the replies as they arrive (the simulator's transport).

    After a round, :attr:`lost` maps each sampled client that gave no usable
    reply to the reason, and :attr:`malformed` each reply that could not be
    decoded to the error (rejected, never folded).
    """

    def __init__(self, grid: Any, nodes: NodeDirectory, cfg: RunConfig,
                 on_metrics: Callable[[int, Any], None] | None = None) -> None:
        self.grid = grid
        self.nodes = nodes
        self.identity = run_identity(cfg)
        self.timeout = cfg.flower.round_timeout_s
        self.in_client_order = cfg.flower.fold_order == CLIENT_ID
        self.on_metrics = on_metrics
        self.lost: dict[int, str] = {}
        self.malformed: dict[int, str] = {}

    def reachable(self, client_id: int) -> bool:
        """The client's partition has a node now."""
        return client_id in self.nodes.node_of

    def replies(self, rnd: int, downlinks: dict[int, Message]) -> Iterator[Reply]:
        """Push every downlink, then yield replies until all arrived or ``flower.round_timeout_s`` passed."""
        self.lost, self.malformed = {}, {}
        sent = self._push(rnd, downlinks)
        deadline = time.monotonic() + self.timeout
        ready: dict[int, Reply] = {}
        order = sorted(sent.values())
        while sent and time.monotonic() < deadline:
            replies = list(self.grid.pull_messages(list(sent)))
            for reply in replies:
                cid = sent.pop(reply.metadata.reply_to_message_id, None)
                if cid is not None:
                    decoded = self._decode(cid, reply)
                    if decoded is not None:
                        ready[cid] = decoded
            yield from self._release(ready, order, waiting=set(sent.values()))
            if not replies:
                time.sleep(POLL_S)
        for cid in sent.values():
            self.lost[cid] = f"no reply within flower.round_timeout_s = {self.timeout:g} s"
        yield from self._release(ready, order, waiting=set())

    def _push(self, rnd: int, downlinks: dict[int, Message]) -> dict[str, int]:
        """Message id -> client id of the downlinks pushed (clients without a node are lost at once)."""
        messages, clients = [], []
        for cid in sorted(downlinks):
            downlink = downlinks.pop(cid)
            node = self.nodes.node_of.get(cid)
            if node is None:
                self.lost[cid] = "no node holds its partition"
                continue
            config = ConfigRecord({**self.identity, ROUND: rnd, CLIENT: cid})
            messages.append(FlowerMessage(message_content(downlink, **{CONFIG: config}), dst_node_id=node,
                                          message_type="train"))
            clients.append(cid)
        ids = list(self.grid.push_messages(messages)) if messages else []
        return {mid: cid for mid, cid in zip(ids, clients) if mid}

    def _decode(self, cid: int, reply: FlowerMessage) -> Reply | None:
        if reply.has_error():
            self.lost[cid] = f"node error: {reply.error.reason}"
            return None
        if reply.metadata.src_node_id != self.nodes.node_of.get(cid):
            self.malformed[cid] = f"reply from node {reply.metadata.src_node_id}, not the client's node"
            return None
        try:
            message = message_of(reply.content)
        except WireError as err:
            self.malformed[cid] = f"malformed payload: {err}"
            return None
        if self.on_metrics is not None and METRICS in reply.content:
            self.on_metrics(cid, reply.content[METRICS])
        return Reply(cid, message)

    def _release(self, ready: dict[int, Reply], order: list[int], *, waiting: set[int]) -> Iterator[Reply]:
        """Yield what may be folded now: everything (arrival order) or the client-id prefix no one waits before."""
        if not self.in_client_order:
            for cid in list(ready):
                yield ready.pop(cid)
            return
        for cid in order:
            if cid in ready:
                yield ready.pop(cid)
            elif cid in waiting:
                return


class FlowerRun(Simulation):
    """A federated run of ``cfg`` whose clients are Flower nodes reached through ``grid``.

    Args:
        cfg: the run configuration (``flower.*`` read here).
        grid: the Flower Grid of the ServerApp.
        quiet, resume, overwrite: as for :class:`~fs_gmfl.hosts.sim.runner.Simulation`.
    """

    def __init__(self, cfg: RunConfig, grid: Any, *, quiet: bool = False, resume: bool = False,
                 overwrite: bool = False) -> None:
        check_flower_config(cfg)
        super().__init__(cfg, quiet=quiet, resume=resume, overwrite=overwrite)
        self.grid = grid

    def setup(self) -> None:
        """The simulator's set-up (model and data for evaluation, the method), then the nodes."""
        super().setup()
        reset = self.method.clients_reset
        if self.checkpoint is not None and reset is not None:
            reset()  # the nodes of a new Flower run hold nothing of the run being resumed
            logger.warning("flower: resuming: the server forgets what each client's model held; the next downlinks "
                           "bring every client from the initial model")
        prepare = run_identity(self.cfg) if clients_outlive_messages(self.grid) else None
        self.nodes = NodeDirectory(self.grid, self.cfg.federate.client_num, on_replaced=self._client_replaced,
                                   prepare=prepare)
        self.nodes.wait_for_all(self.cfg.flower.node_wait_s)
        self.transport = GridTransport(self.grid, self.nodes, self.cfg, on_metrics=self._client_metrics)

    def _client_replaced(self, cid: int) -> None:
        if self.method.clients_reset is not None:
            self.method.clients_reset()
            logger.warning("flower: client %d restarted; the server forgets what each client's model holds", cid)

    def _client_metrics(self, cid: int, metrics: Any) -> None:
        seconds = metrics.get(STEP_SECONDS, []) if hasattr(metrics, "get") else []
        if isinstance(seconds, list):
            self.step_seconds.extend(float(s) for s in seconds if isinstance(s, (int, float)))

    def record_downlinks(self, rnd: int, downlinks: dict[int, Message]) -> None:
        """Count the downlinks that will be sent: those of clients whose partition has a node."""
        self.nodes.refresh()
        for cid, message in downlinks.items():
            if self.transport.reachable(cid):
                self.ledger.record(rnd, cid, "downlink", message)

    def run_round(self, rnd: int) -> dict[str, Any]:
        """The simulator's round; lost clients and undecodable replies are logged and added to the row."""
        row = super().run_round(rnd)
        for cid, reason in sorted(self.transport.malformed.items()):
            logger.warning("round %d: update of client %d rejected: %s", rnd, cid, reason)
            self.rejections["malformed"] = self.rejections.get("malformed", 0) + 1
        if self.transport.malformed:  # they arrived, and were rejected before reaching the strategy
            row["replies"] = row.get("replies", 0) + len(self.transport.malformed)
            row["rejected"] = row.get("rejected", 0) + len(self.transport.malformed)
        if self.transport.lost:
            for cid, reason in sorted(self.transport.lost.items()):
                logger.warning("round %d: client %d lost: %s", rnd, cid, reason)
            row["lost_clients"] = {str(cid): reason for cid, reason in sorted(self.transport.lost.items())}
        return row

    def _fit_client(self, rnd: int, client_id: int, message: Message) -> Message:  # pragma: no cover - not used
        raise RuntimeError("the Flower host trains clients on its nodes")


def run_identity(cfg: RunConfig) -> dict[str, str]:
    """The ConfigRecord entries a client builds its runtime from: the resolved YAML and its digest."""
    text = config_to_yaml(cfg)
    return {CFG_TEXT: text, CFG_DIGEST: config_digest(text)}


def clients_outlive_messages(grid: Any) -> bool:
    """Whether the nodes' client processes serve more than one message: Flower's simulation engine.

    Its ``InMemoryGrid`` feeds long-lived Ray actors, so a client runtime built
    while answering the partition query is still there for round 1. A deployed
    SuperNode starts a fresh ``flwr-clientapp`` process per message, where
    building at the query would only be thrown away.
    """
    return type(grid).__name__ == "InMemoryGrid"


def check_flower_config(cfg: RunConfig) -> None:
    """Refuse what the Flower host cannot run (one line each)."""
    if cfg.faults.active or cfg.faults.nan_clients:
        raise ConfigError("faults", "set", "inactive on the Flower host: its faults are real (a node that dies or "
                          "stays silent past flower.round_timeout_s costs its reply); faults.* simulates them in "
                          "fs-gmfl run")
    ray_dir = os.path.abspath(cfg.flower.ray_temp_dir) if cfg.flower.ray_temp_dir else ""
    if len(ray_dir) > MAX_RAY_DIR:
        raise ConfigError("flower.ray_temp_dir", cfg.flower.ray_temp_dir, f"a directory of at most {MAX_RAY_DIR} "
                          "characters as an absolute path (Ray puts unix sockets under it, and their paths may not "
                          "exceed 107 bytes)")
    if cfg.gmfl.use and cfg.gmfl.downlink == "stateful_sync":
        raise ConfigError("gmfl.downlink", "stateful_sync", "'stateless' on the Flower host: a node that restarts "
                          "loses the adapter it cached, and the server cannot tell")
