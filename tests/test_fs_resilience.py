"""The deadlines of a distributed FederatedScope run, unit by unit (no processes; the process-level faults are in
``test_fs_faults.py``): the blocking inbox, gRPC sends with a deadline, and the server's decisions when a sampled
client is silent, unreachable, late or restarted."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

fs = pytest.importorskip("federatedscope", reason="FederatedScope (branch llm) is not installed: FederatedScope host "
                         "tests skipped")
resilience = pytest.importorskip("fs_gmfl.hosts.fs.resilience")
pytestmark = pytest.mark.fs_host


def test_inbox_blocks_until_a_message_or_the_timeout():
    inbox = resilience.Inbox()
    start = time.monotonic()
    assert inbox.pop(0.3) is None
    assert 0.25 <= time.monotonic() - start < 2.0
    threading.Timer(0.2, inbox.append, ("hello",)).start()
    assert inbox.pop(5.0) == "hello" and len(inbox) == 0


def test_receive_waits_without_spinning_and_keeps_earlier_messages():
    """make_resilient moves what FederatedScope's deque held into the inbox; a receive that waits 1 s burns no
    core (FederatedScope's busy loop would use ~1 CPU second)."""
    from federatedscope.core.communication import gRPCCommManager
    from federatedscope.core.message import Message
    from federatedscope.core.proto import gRPC_comm_manager_pb2

    cfg = SimpleNamespace(grpc_max_send_message_length=1 << 20, grpc_max_receive_message_length=1 << 20,
                          grpc_enable_http_proxy=False, grpc_compression="nocompression")
    comm = gRPCCommManager(host="127.0.0.1", port="0", client_num=1, cfg=cfg)
    try:
        early = Message(msg_type="join_in", sender=3, receiver=[0], state=0, content="x")
        comm.server_funcs.msg_queue.append(gRPC_comm_manager_pb2.MessageRequest(msg=early.transform(to_list=True).msg))
        comm = resilience.make_resilient(comm, rpc_timeout_s=2.0)
        got = comm.receive(1.0)
        assert (got.msg_type, got.sender) == ("join_in", 3)
        cpu = time.process_time()
        assert comm.receive(1.0) is None
        assert time.process_time() - cpu < 0.3
    finally:
        comm.grpc_server.stop(None)


def test_send_to_a_dead_address_fails_fast_and_names_the_receiver():
    from federatedscope.core.communication import gRPCCommManager
    from federatedscope.core.message import Message

    cfg = SimpleNamespace(grpc_max_send_message_length=1 << 20, grpc_max_receive_message_length=1 << 20,
                          grpc_enable_http_proxy=False, grpc_compression="nocompression")
    comm = resilience.make_resilient(gRPCCommManager(host="127.0.0.1", port="0", client_num=1, cfg=cfg), 3.0)
    try:
        comm.add_neighbors(1, "127.0.0.1:9")  # discard port: nobody listens
        start = time.monotonic()
        failed = comm.send(Message(msg_type="finish", sender=0, receiver=[1, 2], state=0, content="x"))
        assert failed == [1, 2]  # 2 never joined: no address
        assert time.monotonic() - start < 3.5
    finally:
        comm.grpc_server.stop(None)


class FakeServer(resilience.ResilientServer):
    """The mixin's decisions over a stand-in for FederatedScope's server (what it reads and what it calls)."""

    def __init__(self, **tolerance):
        base = dict(round_timeout_s=60.0, min_replies=1, join_timeout_s=60.0, heartbeat_s=1.0,
                    client_timeout_s=5.0, server_timeout_s=60.0, rpc_timeout_s=5.0)
        self.tolerance = SimpleNamespace(**{**base, **tolerance})
        self.distributed, self.started, self.state, self.client_num = True, True, 1, 3
        self.msg_buffer = {"train": {}, "eval": {}}
        self.waits, self.last_seen, self.busy, self.rounds = {}, {}, set(), {}
        self.moved_on, self.failed, self.failure = [], [], None
        self.since_start = time.monotonic()

    def check_and_move_on(self, check_eval_result=False, min_received_num=None):
        self.moved_on.append((check_eval_result, min_received_num))

    def fail(self, reason, *, save=True):
        self.failed.append(reason)

    def reply(self, cid):
        self.msg_buffer["train"].setdefault(self.state, {})[cid] = object()


def test_undelivered_client_is_lost_at_once_and_the_round_closes_on_the_others():
    server = FakeServer()
    server.watch("train", 1, [1, 2, 3], lost={3: resilience.UNDELIVERED})
    server.reply(1)
    server._check_deadlines()
    assert server.moved_on == []  # client 2 is alive and has time left
    server.reply(2)
    server._check_deadlines()
    assert server.moved_on == [(False, 2)] and server.rounds[2]["lost_clients"] == [3]


def test_silent_client_is_lost_after_client_timeout():
    server = FakeServer(client_timeout_s=5.0)
    server.watch("train", 1, [1, 2], lost={})
    server.reply(1)
    server.waits["train"].since -= 6.0  # asked 6 s ago, nothing heard from client 2 since
    server.last_seen[2] = time.monotonic() - 6.0
    server._check_deadlines()
    assert server.moved_on == [(False, 1)] and "train" not in server.waits


def test_heartbeating_client_is_waited_for_until_round_timeout_then_marked_busy():
    server = FakeServer(client_timeout_s=5.0, round_timeout_s=20.0)
    server.watch("train", 1, [1, 2], lost={})
    server.reply(1)
    server.waits["train"].since -= 10.0
    server.last_seen[2] = time.monotonic()  # heartbeat just now: alive
    server._check_deadlines()
    assert server.moved_on == []
    server.waits["train"].since -= 15.0  # 25 s > round_timeout_s
    server.last_seen[2] = time.monotonic()
    server._check_deadlines()
    assert server.moved_on == [(False, 1)]
    asked, skipped = server.available([1, 2])
    assert asked == [1] and "still busy" in skipped[2]  # the late client gets no new work while it is busy


def test_client_silent_past_client_timeout_is_not_asked_until_it_is_heard_again():
    server = FakeServer(client_timeout_s=5.0)
    server.since_start = time.monotonic() - 60.0
    server.last_seen = {1: time.monotonic(), 2: time.monotonic() - 10.0}
    asked, skipped = server.available([1, 2, 3])
    assert asked == [1] and set(skipped) == {2, 3} and "no message for 10 s" in skipped[2]
    server.last_seen[2] = time.monotonic()  # its heartbeat is back
    assert server.available([1, 2])[0] == [1, 2]


def test_too_few_replies_fail_the_run():
    server = FakeServer(min_replies=2)
    server.watch("train", 1, [1, 2, 3], lost=dict.fromkeys([2, 3], resilience.UNDELIVERED))
    server.reply(1)
    server._check_deadlines()
    assert server.moved_on == [] and len(server.failed) == 1
    assert "1 of 3 replies arrived, fewer than fault_tolerance.min_replies = 2" in server.failed[0]


def test_late_and_unrequested_replies_are_dropped():
    server = FakeServer()
    server.watch("train", 1, [1, 2], lost={})
    late = SimpleNamespace(sender=1, state=0)
    unasked = SimpleNamespace(sender=3, state=1)
    current = SimpleNamespace(sender=2, state=1)
    assert not server.expects_reply(late) and not server.expects_reply(unasked)
    assert server.expects_reply(current)


def test_evaluation_without_results_still_finishes_the_last_round():
    server = FakeServer()
    server.state = server.total_round_num = 4
    saved = []
    server.check_and_save = lambda: saved.append(True)
    server.watch("eval", 3, [1, 2], lost=dict.fromkeys([1, 2], resilience.UNDELIVERED))
    server._check_deadlines()
    assert saved == [True] and server.msg_buffer["eval"] == {3: {}}


def test_hostile_joins_are_ignored_and_a_new_session_is_a_restart():
    """A join with a made-up id, a port that is not an integer, or no address changes nothing; the same id with a
    new session token is a restarted process (its old place, the restart handling)."""
    server = FakeServer()
    neighbors, restarted = {}, []
    server.comm_manager = SimpleNamespace(neighbors=neighbors, add_neighbors=lambda neighbor_id, address:
                                          neighbors.__setitem__(neighbor_id, address))
    server.sessions, server.started = {}, False
    server._client_restarted = restarted.append
    server.trigger_for_start = lambda short_handed=False: None

    def join(sender, content):
        server.callback_funcs_for_join_in(SimpleNamespace(msg_type="join_in", sender=sender, content=content))

    join(99, {"host": "127.0.0.1", "port": 5, "session": "a"})
    join(1, {"host": "127.0.0.1", "port": "5; rm -rf /", "session": "a"})
    join(1, {"host": "127.0.0.1", "port": True, "session": "a"})
    join(1, "127.0.0.1:5")
    assert neighbors == {} and server.sessions == {}
    join(1, {"host": "127.0.0.1", "port": 5, "session": "a", "idle": 1})
    join(1, {"host": "127.0.0.1", "port": 5, "session": "a", "idle": 1})  # a heartbeat
    assert neighbors == {1: "127.0.0.1:5"} and restarted == []
    join(1, {"host": "127.0.0.1", "port": 6, "session": "b", "idle": 1})
    assert neighbors == {1: "127.0.0.1:6"} and restarted == [1]


def test_an_unreadable_message_is_dropped_not_raised():
    from federatedscope.core.proto import gRPC_comm_manager_pb2

    comm = SimpleNamespace(inbox=resilience.Inbox())
    comm.inbox.append(gRPC_comm_manager_pb2.MessageRequest())  # no sender, no type
    assert resilience.DeadlineCommManager.receive(comm, 0.1) is None
