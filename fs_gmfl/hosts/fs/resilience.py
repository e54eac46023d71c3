"""Distributed (gRPC) FederatedScope runs that survive dead, late and restarted participants.

FederatedScope's distributed mode waits without a deadline everywhere: its
message loop polls an empty queue in a busy loop, a client's join sent before
the server listens is lost, the server waits forever for a dead client's
reply, clients wait forever for a dead server, a restarted client is given a
new id by join order, and no gRPC call has a deadline. This module replaces
those waits, inside fs_gmfl's server and client classes (no FederatedScope
change), with the rules of ``fault_tolerance.*``
(:class:`~fs_gmfl.config.fault_tolerance.FaultToleranceConfig`):

* **Transport** (:func:`make_resilient`): every gRPC call has a deadline
  (``rpc_timeout_s``) and reports which receivers failed; the receive queue
  blocks on a condition with a timeout instead of spinning a core.
* **Identity**: a client's id is its ``distribute.data_idx`` (the shard it
  trains), not its place in the join order, so a restarted client takes its
  old place. Each client process announces a random session token with its
  join: a known id with a new token is a restarted process.
* **Joining** (:class:`ResilientClient`): a client retries its join with
  back-off until ``join_timeout_s``, so the processes may start in any order;
  afterwards it repeats the join every ``heartbeat_s`` as a heartbeat, which
  also makes a restarted server (``federate.restore_from``) know the clients
  that are still running.
* **Rounds** (:class:`ResilientServer`): the server waits for a round's
  replies (and for evaluation results) until every sampled client replied or
  was lost: its downlink could not be delivered, it has been silent for
  ``client_timeout_s`` (no heartbeat: the process is gone), it restarted, or
  ``round_timeout_s`` passed (late). It then aggregates what arrived if at
  least ``min_replies`` did and logs whom it lost; otherwise it saves a
  checkpoint, tells the clients, and the run stops with one line and exit 1.
* **A server that is gone**: its clients stop with one line and exit 1 after
  ``server_timeout_s`` without contact.
* ``finish`` is sent once, and stale or unrequested replies are dropped.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from federatedscope.core.auxiliaries.utils import add_prefix_to_path
from federatedscope.core.communication import gRPCCommManager
from federatedscope.core.message import Message
from federatedscope.core.proto import gRPC_comm_manager_pb2_grpc

from fs_gmfl.config.fault_tolerance import FaultToleranceConfig

logger = logging.getLogger("federatedscope." + __name__)

#: seconds a message loop blocks waiting for a message before it checks its deadlines.
POLL_S = 0.5
#: message type the server sends its clients when it stops the run early (content: the reason).
ABORT = "fs_gmfl_abort"
#: why a client is lost whose message could not be delivered.
UNDELIVERED = "its message could not be delivered"
#: first and largest pause between a client's join attempts.
JOIN_BACKOFF_S = (0.5, 8.0)


# -- transport -------------------------------------------------------------------------------------
class Inbox:
    """The gRPC servicer's message queue: ``append`` from gRPC threads, :meth:`pop` blocks with a timeout.

    FederatedScope's queue is a deque its receiver polls in a busy loop (a
    core at 100 % while a process waits); this one sleeps on a condition.
    """

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._ready = threading.Condition()

    def append(self, item: Any) -> None:
        """Queue a received request (called by the gRPC servicer)."""
        with self._ready:
            self._items.append(item)
            self._ready.notify()

    def pop(self, timeout: float) -> Any | None:
        """The oldest request, waiting at most ``timeout`` seconds for one; ``None`` if none came."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._items, timeout=timeout):
                return None
            return self._items.popleft()

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)


class DeadlineCommManager(gRPCCommManager):
    """FederatedScope's gRPC communication manager with a deadline on every call and a blocking receive.

    Not constructed directly: :func:`make_resilient` turns a running
    ``gRPCCommManager`` into one (its gRPC server keeps listening).
    """

    inbox: Inbox
    rpc_timeout_s: float

    def send(self, message: Message, quiet: bool = False) -> list[int]:
        """Send ``message`` to each receiver; returns the receivers it could not be delivered to.

        A receiver without a known address (it never joined) counts as failed.
        Each failure is logged in one line unless ``quiet``.
        """
        receivers = message.receiver if message.receiver is not None else list(self.neighbors)
        receivers = receivers if isinstance(receivers, list) else [receivers]
        request = message.transform(to_list=True)
        return [r for r in receivers
                if not (r in self.neighbors and self._deliver(self.neighbors[r], request, quiet))]

    def _deliver(self, address: str, request: Any, quiet: bool) -> bool:
        """One gRPC call with a deadline; False if it failed."""
        channel = grpc.insecure_channel(address, compression=self.comp_method,
                                        options=(("grpc.enable_http_proxy", 0),))
        try:
            gRPC_comm_manager_pb2_grpc.gRPCComServeFuncStub(channel).sendMessage(request,
                                                                                 timeout=self.rpc_timeout_s)
            return True
        except grpc.RpcError as err:
            if not quiet:
                code = err.code() if hasattr(err, "code") else None
                logger.warning(f"fs_gmfl: message to {address} not delivered: {getattr(code, 'name', code)}")
            return False
        finally:
            channel.close()

    def receive(self, timeout: float = POLL_S) -> Message | None:  # type: ignore[override]
        """The next message, or ``None`` after ``timeout`` seconds without one (no busy wait)."""
        request = self.inbox.pop(timeout)
        if request is None:
            return None
        message = Message()
        try:
            message.parse(request.msg)
            int(message.sender)
        except Exception as err:  # noqa: BLE001 - anything a peer sends must not stop this process
            logger.warning(f"fs_gmfl: unreadable message dropped ({type(err).__name__}: {err})")
            return None
        return message

    def pending(self) -> int:
        """Messages received and not yet taken."""
        return len(self.inbox)

    def stop(self) -> None:
        """Stop listening (so no gRPC thread outlives the run)."""
        self.grpc_server.stop(grace=None)


def make_resilient(comm_manager: gRPCCommManager, rpc_timeout_s: float) -> DeadlineCommManager:
    """Turn FederatedScope's running gRPC manager into a :class:`DeadlineCommManager`, keeping what it received."""
    servicer = comm_manager.server_funcs
    inbox = Inbox()
    earlier, servicer.msg_queue = servicer.msg_queue, inbox
    while earlier:
        inbox.append(earlier.popleft())
    comm_manager.__class__ = DeadlineCommManager
    comm_manager.inbox = inbox
    comm_manager.rpc_timeout_s = rpc_timeout_s
    return comm_manager


def _is_address(content: Any) -> bool:
    """Whether a join's content names a host (string) and a port (integer)."""
    return isinstance(content, dict) and isinstance(content.get("host"), str) and \
        isinstance(content.get("port"), int) and not isinstance(content.get("port"), bool)


# -- the server ------------------------------------------------------------------------------------
@dataclass
class Wait:
    """The server waiting for replies: a round's uplinks (``train``) or its evaluation results (``eval``).

    Attributes:
        kind: ``"train"`` or ``"eval"`` (FederatedScope's message buffers).
        state: the round state the replies carry (FederatedScope's 0-based round).
        expected: the clients asked.
        since: when they were asked (``time.monotonic()``).
        lost: client -> why the server stopped waiting for it.
    """

    kind: str
    state: int
    expected: set[int]
    since: float
    lost: dict[int, str] = field(default_factory=dict)


class ResilientServer:
    """Mixin for an fs_gmfl FederatedScope server (before ``Server`` in the bases): the deadlines of
    ``fault_tolerance.*`` in distributed mode; standalone runs are unchanged."""

    def init_resilience(self, tolerance: FaultToleranceConfig) -> None:
        """Called at the end of the server's ``__init__`` with the run's ``fault_tolerance`` section (the
        bookkeeping exists in both modes; only distributed mode waits with deadlines)."""
        self.failure: str | None = None
        self.tolerance = tolerance
        self.started, self.finish_sent = False, False
        self.since_start = time.monotonic()
        self.last_seen: dict[int, float] = {}
        self.sessions: dict[int, str] = {}
        self.waits: dict[str, Wait] = {}
        self.round_downlinks: dict[int, Any] = {}
        self.busy: set[int] = set()
        if self.distributed:
            self.comm_manager = make_resilient(self.comm_manager, self.tolerance.rpc_timeout_s)

    # -- the message loop ------------------------------------------------------------------------
    def run(self) -> None:
        """FederatedScope's distributed loop, with deadlines: ends finished, or failed with :attr:`failure`."""
        if not self.distributed:
            return super().run()
        logger.info(f"fs_gmfl: waiting for {self.client_num} clients to join (fault_tolerance.join_timeout_s = "
                    f"{self.tolerance.join_timeout_s:g} s)")
        try:
            while self.state <= self.total_round_num and self.failure is None:
                message = self.comm_manager.receive(POLL_S)
                if message is not None:
                    self._handle(message)
                if not self.comm_manager.pending():
                    self._check_deadlines()
        finally:
            self.comm_manager.stop()
        return None

    def _handle(self, message: Message) -> None:
        self.last_seen[int(message.sender)] = time.monotonic()
        handler = self.msg_handlers.get(message.msg_type)
        if handler is None:
            logger.warning(f"fs_gmfl: message of unknown type '{message.msg_type}' from {message.sender} ignored")
            return
        handler(message)

    def _check_deadlines(self) -> None:
        if not self.started:
            self._check_join_deadline()
            return
        for kind in ("train", "eval"):
            wait = self.waits.get(kind)
            if wait is not None and self.failure is None:
                self._check_wait(wait)

    # -- joining ---------------------------------------------------------------------------------
    def callback_funcs_for_join_in(self, message: Message) -> None:
        """A client's join or heartbeat (both are ``join_in`` messages): idempotent, keyed by the client's id.

        A known id with a new session token is a restarted client process: it
        takes its old place. Clients without an id of their own (``-1``) are
        numbered by FederatedScope in join order, before the start only.
        """
        if not self.distributed or "info" in message.msg_type:
            return super().callback_funcs_for_join_in(message)
        sender, content = int(message.sender), message.content
        if sender == -1:
            if self.started:
                logger.warning("fs_gmfl: a client without an id (distribute.data_idx) joined after the start: "
                               "ignored")
                return None
            super().callback_funcs_for_join_in(message)  # numbers it, and starts once all have joined
            if isinstance(content, dict):
                self.sessions[self.join_in_client_num] = str(content.get("session", ""))
            return None
        if not 1 <= sender <= self.client_num or not _is_address(content):
            logger.warning(f"fs_gmfl: join from client id {sender} ignored (ids are 1..{self.client_num}, with a "
                           "host and a port)")
            return None
        address = f"{content['host']}:{content['port']}"
        session, before = str(content.get("session", "")), self.sessions.get(sender)
        self.sessions[sender] = session
        self.comm_manager.add_neighbors(neighbor_id=sender, address=address)
        if before is None:
            logger.info(f"fs_gmfl: client #{sender} joined from {address} ({len(self.comm_manager.neighbors)} of "
                        f"{self.client_num}){'; it takes part from the next round' if self.started else ''}")
        elif before != session:
            logger.warning(f"fs_gmfl: client #{sender} restarted (new process at {address})")
            self._client_restarted(sender)
        if content.get("idle") == 1:
            self.busy.discard(sender)
        self.trigger_for_start()
        return None

    def trigger_for_start(self, short_handed: bool = False) -> None:
        """Start the course once, when every client has joined (or, ``short_handed``, at the join deadline)."""
        if self.distributed:
            if self.started or (len(self.comm_manager.neighbors) < self.client_num and not short_handed):
                return
            self.started = True
            self.join_in_client_num = self.client_num  # what FederatedScope's start checks
        super().trigger_for_start()

    def _check_join_deadline(self) -> None:
        waited = time.monotonic() - self.since_start
        if waited <= self.tolerance.join_timeout_s:
            return
        joined = len(self.comm_manager.neighbors)
        if joined < min(self.tolerance.min_replies, self.client_num):
            self.fail(f"only {joined} of {self.client_num} clients joined within fault_tolerance.join_timeout_s = "
                      f"{self.tolerance.join_timeout_s:g} s (fault_tolerance.min_replies = "
                      f"{self.tolerance.min_replies})", save=False)
            return
        missing = sorted(set(range(1, self.client_num + 1)) - set(self.comm_manager.neighbors))
        logger.warning(f"fs_gmfl: starting with {joined} of {self.client_num} clients after "
                       f"fault_tolerance.join_timeout_s; not joined: {missing} (they may join later)")
        self.trigger_for_start(short_handed=True)

    def _client_restarted(self, cid: int) -> None:
        """A client process restarted: it lost what it was doing and what it held.

        Methods whose server tracks what each client's model holds (FedKRSO,
        FFT) forget it, so the next downlinks bring the clients from the
        initial model. A round's downlink is sent again to a restarted client
        of a method without client-held state; otherwise that client is lost
        for the round and takes part from the next one.
        """
        self.busy.discard(cid)
        reset = self.method.clients_reset
        if reset is not None:
            reset()
            logger.warning("fs_gmfl: the server forgets what each client's model holds; the next downlinks "
                           "bring every client from the initial model")
        train = self.waits.get("train")
        if train is not None and cid in train.expected and cid not in self._received(train):
            if reset is None and cid in self.round_downlinks:
                train.lost.pop(cid, None)
                logger.info(f"fs_gmfl: round {train.state + 1}: downlink sent again to restarted client #{cid}")
                self.send_downlink(train.state + 1, cid, self.round_downlinks[cid])
            else:
                self._lose(train, cid, "restarted; takes part from the next round")
        evaluation = self.waits.get("eval")
        if evaluation is not None and cid in evaluation.expected:
            self._lose(evaluation, cid, "restarted during the evaluation")

    # -- waiting for replies ---------------------------------------------------------------------
    def available(self, receivers: list[int]) -> tuple[list[int], dict[int, str]]:
        """``receivers`` split into those to ask now and those not to ask, with why.

        Not asked: a client the server has not heard from for
        ``client_timeout_s`` (gone or cut off: sending to it would fail or
        wait ``rpc_timeout_s``; it is asked again once its heartbeat is back),
        and a late client still busy with a round whose deadline it missed
        (until its late reply arrives or a heartbeat says it is idle), so
        messages do not pile up in its queue and it keeps up once it is done.
        """
        if not self.distributed:
            return receivers, {}
        now, tolerance = time.monotonic(), self.tolerance
        skipped: dict[int, str] = {}
        for cid in receivers:
            silent = now - self.last_seen.get(cid, self.since_start)
            if cid in self.busy:
                skipped[cid] = "not asked: still busy with an earlier round it was late for"
            elif self.started and silent > tolerance.client_timeout_s:
                skipped[cid] = f"not asked: no message for {silent:.0f} s (fault_tolerance.client_timeout_s = " \
                               f"{tolerance.client_timeout_s:g})"
        return [r for r in receivers if r not in skipped], skipped

    def watch(self, kind: str, state: int, receivers: list[int], lost: dict[int, str]) -> None:
        """Start waiting for the replies of ``receivers``; those in ``lost`` (client -> why) are lost at once."""
        if not self.distributed:
            return
        wait = Wait(kind, state, set(receivers), time.monotonic())
        for cid, why in lost.items():
            self._lose(wait, cid, why)
        self.waits[kind] = wait

    def _received(self, wait: Wait) -> set[int]:
        return {int(c) for c in self.msg_buffer[wait.kind].get(wait.state, {})}

    def _lose(self, wait: Wait, cid: int, why: str) -> None:
        if cid not in wait.lost:
            wait.lost[cid] = why
            what = "round" if wait.kind == "train" else "evaluation of round"
            logger.warning(f"fs_gmfl: {what} {wait.state + 1}: client #{cid} lost: {why}")

    def _check_wait(self, wait: Wait) -> None:
        now, tolerance = time.monotonic(), self.tolerance
        received = self._received(wait)
        for cid in wait.expected - received - wait.lost.keys():
            silent = now - max(self.last_seen.get(cid, 0.0), wait.since)
            if silent > tolerance.client_timeout_s:
                self._lose(wait, cid, f"no message for {silent:.0f} s (fault_tolerance.client_timeout_s = "
                                      f"{tolerance.client_timeout_s:g}): the process is gone or unreachable")
        pending = wait.expected - received - wait.lost.keys()
        if pending and now - wait.since <= tolerance.round_timeout_s:
            return
        for cid in pending:
            self._lose(wait, cid, f"no reply within fault_tolerance.round_timeout_s = {tolerance.round_timeout_s:g} s")
            self.busy.add(cid)
        if wait.lost or not wait.expected:
            self._close(wait, len(received))

    def _close(self, wait: Wait, arrived: int) -> None:
        """Go on without the lost clients: aggregate (or merge the evaluation) with the replies that arrived."""
        self.waits.pop(wait.kind, None)
        lost = ", ".join(f"#{c}" for c in sorted(wait.lost))
        if wait.kind == "eval":
            self._close_evaluation(wait, arrived, lost)
            return
        need = max(1, min(self.tolerance.min_replies, len(wait.expected)))
        if arrived < need:
            self.fail(f"round {wait.state + 1}: {arrived} of {len(wait.expected)} replies arrived, fewer than "
                      f"fault_tolerance.min_replies = {self.tolerance.min_replies} (lost: {lost})")
            return
        logger.warning(f"fs_gmfl: round {wait.state + 1}: aggregating {arrived} of {len(wait.expected)} replies "
                       f"(lost: {lost})")
        self.rounds.setdefault(wait.state + 1, {})["lost_clients"] = sorted(wait.lost)
        self.check_and_move_on(min_received_num=arrived)

    def _close_evaluation(self, wait: Wait, arrived: int, lost: str) -> None:
        if arrived:
            logger.warning(f"fs_gmfl: evaluation of round {wait.state + 1}: merging {arrived} of "
                           f"{len(wait.expected)} results (lost: {lost})")
            self.check_and_move_on(check_eval_result=True, min_received_num=arrived)
            return
        logger.warning(f"fs_gmfl: evaluation of round {wait.state + 1}: no result arrived (lost: {lost})")
        if self.state >= self.total_round_num:  # the course is over: finish without the final evaluation
            self.msg_buffer["eval"].setdefault(wait.state, {})
            self.check_and_save()

    def _perform_federated_aggregation(self) -> int:
        self.waits.pop("train", None)
        self.round_downlinks = {}
        return super()._perform_federated_aggregation()

    def _merge_and_format_eval_results(self) -> None:
        self.waits.pop("eval", None)
        return super()._merge_and_format_eval_results()

    def expects_reply(self, message: Message) -> bool:
        """Whether an uplink answers a downlink of this round that this server sent (stale, unrequested and
        late replies are dropped with a log line; FederatedScope would assert on their old timestamps)."""
        if not self.distributed:
            return True
        wait, sender = self.waits.get("train"), int(message.sender)
        self.busy.discard(sender)
        if wait is not None and message.state == wait.state and sender in wait.expected:
            return True
        logger.warning(f"fs_gmfl: reply of client #{sender} for round {message.state + 1} dropped: "
                       f"{'late' if message.state < self.state else 'not asked for by this server'}")
        return False

    # -- ending ----------------------------------------------------------------------------------
    def fail(self, reason: str, *, save: bool = True) -> None:
        """Stop the run: save a checkpoint of the last finished round, tell the clients, record the reason."""
        if save:
            path = self._save_stop_checkpoint()
            reason += f"; the state of round {self.state} is saved: restart with federate.restore_from {path}"
        self.failure = reason
        logger.error(f"fs_gmfl: {reason}")
        self.comm_manager.send(Message(msg_type=ABORT, sender=self.ID, receiver=list(self.comm_manager.neighbors),
                                       state=self.state, timestamp=self.cur_timestamp, content=reason))

    def _save_stop_checkpoint(self) -> str:
        save_to = self._cfg.federate.save_to or f"{self._cfg.outdir}/fs_gmfl_stopped.ckpt"
        path = add_prefix_to_path(f"{self.state}_", save_to)
        self.aggregator.save_model(path, self.state)
        return path

    def finish_once(self) -> bool:
        """True the first time it is called in a distributed run: ``finish`` is sent once (FederatedScope's loop
        would send it a second time after ``check_and_save``), always True in standalone mode."""
        if not self.distributed:
            return True
        first, self.finish_sent = not self.finish_sent, True
        return first


# -- the client ------------------------------------------------------------------------------------
class ResilientClient:
    """Mixin for an fs_gmfl FederatedScope client (before ``Client`` in the bases): join with retries, a
    stable id, heartbeats, and an exit when the server is gone; standalone runs are unchanged."""

    def init_resilience(self, tolerance: FaultToleranceConfig) -> None:
        """Called at the end of the client's ``__init__`` with the run's ``fault_tolerance`` section."""
        self.failure: str | None = None
        if self._cfg.federate.mode != "distributed":
            return
        self.tolerance = tolerance
        self.comm_manager = make_resilient(self.comm_manager, self.tolerance.rpc_timeout_s)
        self.session = uuid.uuid4().hex
        self.server_contact = time.monotonic()
        self.joined = self.out_of_contact = self.working = False
        self.stopped = threading.Event()
        data_idx = int(self._cfg.distribute.data_idx)
        if 1 <= data_idx <= self._cfg.federate.client_num:
            self.ID = data_idx
        else:
            logger.warning(f"fs_gmfl: distribute.data_idx = {data_idx} is not a client id (1.."
                           f"{self._cfg.federate.client_num}): the server numbers this client by join order, and "
                           "a restarted process cannot take its old place")

    @property
    def server_address(self) -> str:
        """``host:port`` of the server."""
        return str(self.comm_manager.neighbors.get(self.server_id, "?"))

    def join_in(self) -> None:
        """Join, retrying with back-off until ``fault_tolerance.join_timeout_s``; then heartbeat in the background."""
        if self._cfg.federate.mode != "distributed":
            return super().join_in()
        deadline = time.monotonic() + self.tolerance.join_timeout_s
        pause = JOIN_BACKOFF_S[0]
        while not self._announce():
            if time.monotonic() + pause > deadline:
                self.failure = (f"could not join the server at {self.server_address} within "
                                f"fault_tolerance.join_timeout_s = {self.tolerance.join_timeout_s:g} s")
                return None
            if pause == JOIN_BACKOFF_S[0]:
                logger.info(f"fs_gmfl: waiting for the server at {self.server_address} (retrying until "
                            f"fault_tolerance.join_timeout_s = {self.tolerance.join_timeout_s:g} s)")
            time.sleep(pause)
            pause = min(2 * pause, JOIN_BACKOFF_S[1])
        self.joined = True
        threading.Thread(target=self._heartbeat, name="fs_gmfl-heartbeat", daemon=True).start()
        return None

    def _announce(self) -> bool:
        """One join message (also the heartbeat): this client's address, session token and whether it is idle."""
        idle = not self.working and not self.comm_manager.pending()
        message = Message(msg_type="join_in", sender=self.ID, receiver=[self.server_id], timestamp=0,
                          content={**self.local_address, "session": self.session, "idle": int(idle)})
        delivered = not self.comm_manager.send(message, quiet=True)
        if delivered and self.out_of_contact and self.joined:
            logger.info(f"fs_gmfl: the server at {self.server_address} answers again")
        elif not delivered and not self.out_of_contact and self.joined:
            logger.warning(f"fs_gmfl: the server at {self.server_address} does not answer; retrying every "
                           f"{self.tolerance.heartbeat_s:g} s until fault_tolerance.server_timeout_s = "
                           f"{self.tolerance.server_timeout_s:g} s")
        self.out_of_contact = not delivered
        if delivered:
            self.server_contact = time.monotonic()
        return delivered

    def _heartbeat(self) -> None:
        while not self.stopped.wait(self.tolerance.heartbeat_s):
            if self.ID != -1:  # numbered by join order: wait for the number
                self._announce()

    def run(self) -> None:
        """FederatedScope's client loop, ending at ``finish``, at the server's abort, or when the server is gone."""
        if self._cfg.federate.mode != "distributed":
            return super().run()
        try:
            while self.failure is None:
                message = self.comm_manager.receive(POLL_S)
                if message is None:
                    self._check_server()
                elif self._dispatch(message):
                    break
        finally:
            self.stopped.set()
            self.comm_manager.stop()
        return None

    def _dispatch(self, message: Message) -> bool:
        """Handle one message; True when the course is over for this client."""
        self.server_contact = time.monotonic()
        if message.msg_type == ABORT:
            self.failure = f"the server stopped the run: {message.content}"
            return True
        handler = self.msg_handlers.get(message.msg_type)
        if handler is None:
            logger.warning(f"fs_gmfl: message of unknown type '{message.msg_type}' ignored")
            return False
        self.working = True  # heartbeats tell the server whether this client is busy
        try:
            handler(message)
        finally:
            self.working = False
        return message.msg_type == "finish"

    def _check_server(self) -> None:
        silent = time.monotonic() - self.server_contact
        if silent > self.tolerance.server_timeout_s:
            self.failure = (f"the server at {self.server_address} has been unreachable for {silent:.0f} s "
                            f"(fault_tolerance.server_timeout_s = {self.tolerance.server_timeout_s:g})")
