"""The FederatedScope server folds each uplink on arrival (issue 16 item 4, streaming aggregation).

FederatedScope's own buffer keeps a placeholder per client instead of the payload, so its round bookkeeping
(``check_and_move_on``, staleness) runs unchanged while the server holds one uplink at a time. Built on a bare
server (no FederatedScope run); the end-to-end parity tests of ``test_fs_host.py`` run the same code.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("federatedscope", reason="FederatedScope (branch llm) is not installed: FederatedScope host "
                    "tests skipped")

from federatedscope.core.message import Message as FsMessage  # noqa: E402

from fs_gmfl.core.comm import CommLedger  # noqa: E402
from fs_gmfl.core.fedavg import LoraFedAvg  # noqa: E402
from fs_gmfl.core.message import Message, Reply, samples_tensor  # noqa: E402
from fs_gmfl.hosts.fs import wire  # noqa: E402
from fs_gmfl.hosts.fs import workers  # noqa: E402
from fs_gmfl.hosts.fs.workers import FOLDED, FsGmflServer, ProtocolAggregator, expect_global_dtype  # noqa: E402

pytestmark = pytest.mark.fs_host

A, B = "m.l1.q.lora_A.weight", "m.l1.q.lora_B.weight"


def uplink(value: float, n: int) -> Message:
    """A half-precision uplink (as clients training in fp16 send it) of both LoRA factors."""
    return Message({A: torch.full((2, 3), value, dtype=torch.float16), B: torch.full((3, 2), value,
                                                                                    dtype=torch.float16)},
                   {"num_samples": samples_tensor(n)})


def bare_server(outdir: Path) -> FsGmflServer:
    """An FsGmflServer with a real FedIT strategy and just what FederatedScope's model_para handler reads."""
    server = object.__new__(FsGmflServer)
    strategy = LoraFedAvg({A: torch.zeros(2, 3), B: torch.zeros(3, 2)})
    expect_global_dtype(strategy)
    server.method = SimpleNamespace(strategy=strategy, info={}, trains_backbone=False)
    server._cfg = SimpleNamespace(outdir=str(outdir), federate=SimpleNamespace(mode="standalone", online_aggr=False),
                                  quantization=SimpleNamespace(method="none"), asyn=SimpleNamespace(use=False))
    server.total_round_num, server.wire_dtype, server.ledger = 2, torch.float16, CommLedger()
    server.rounds, server.rejections, server.accepted_total, server.mostly_rejected_rounds = {}, {}, 0, []
    server.evaluation, server.warnings = {"broadcasts": 0, "bytes": 0}, []
    server.is_finish, server.state, server.cur_timestamp, server.staleness_toleration = False, 0, 0, 0
    server.msg_buffer, server.staled_msg_buffer, server.dropout_num = {"train": {}}, [], 0
    server.sampler = SimpleNamespace(change_state=lambda *args: None)
    server.open_round = None
    server.check_and_move_on = lambda *args, **kwargs: False
    strategy.configure_round(1, [0, 1, 2])
    return server


def arrive(server: FsGmflServer, sender: int, message: Message | str, *, state: int = 0) -> FsMessage:
    content = (message.num_samples if isinstance(message, Message) else 1,
               wire.encode(message, wire.UPLINK) if isinstance(message, Message) else message)
    fs_message = FsMessage(msg_type="model_para", sender=sender, receiver=[0], state=state, timestamp=0,
                           content=content)
    server.callback_funcs_model_para(fs_message)
    return fs_message


def test_uplinks_are_folded_on_arrival_and_the_buffer_keeps_placeholders(tmp_path, monkeypatch):
    """Three arrivals (one malformed): FederatedScope's buffer holds placeholders, each decoded uplink is freed
    once folded, and finishing the round gives exactly the strategy's own aggregate of the same replies."""
    # Prepare
    server = bare_server(tmp_path)
    reference = LoraFedAvg({A: torch.zeros(2, 3), B: torch.zeros(3, 2)})
    reference.configure_round(1, [0, 1, 2])
    decoded: list[weakref.ref] = []
    decode = wire.decode

    def watched_decode(payload, expect):
        message = decode(payload, expect=expect)
        decoded.extend(weakref.ref(t) for t in message.tensors.values())
        return message

    monkeypatch.setattr(workers.wire, "decode", watched_decode)
    # Execute
    messages = [arrive(server, 1, uplink(1.0, 1)), arrive(server, 2, "not a payload"),
                arrive(server, 3, uplink(5.0, 3))]
    buffered = dict(server.msg_buffer["train"][0])
    freed = all(ref() is None for ref in decoded)
    result = ProtocolAggregator.aggregate(SimpleNamespace(server=server, names={}), {
        "staleness": [(s, 0) for s in buffered], "client_feedback": list(buffered.values())})
    expected = reference.aggregate(1, [Reply(0, Message({k: v.float() for k, v in uplink(1.0, 1).tensors.items()},
                                                        uplink(1.0, 1).control)),
                                       Reply(2, Message({k: v.float() for k, v in uplink(5.0, 3).tensors.items()},
                                                        uplink(5.0, 3).control))])
    # Assert
    assert [content[1] for content in buffered.values()] == [FOLDED] * 3
    assert all(m.content[1] is FOLDED for m in messages)
    assert freed and len(decoded) == 4
    assert torch.equal(result[A], torch.full((2, 3), 4.0)) and torch.equal(result[B], torch.full((3, 2), 4.0))
    assert expected.accepted == [0, 2]
    row = server.rounds[1]
    assert (row["accepted"], row["rejected"]) == (2, 1)
    assert server.rejections == {"malformed payload": 1}
    assert server.open_round is None


def test_a_stale_message_is_folded_when_the_round_is_aggregated(tmp_path):
    """A message of an earlier round stays in FederatedScope's stale buffer and is judged at aggregation time
    (here: client 1 was sampled in round 1 and had not replied, so it is accepted, as before this change)."""
    # Prepare
    server = bare_server(tmp_path)
    server.state, server.staleness_toleration = 1, 1
    server.method.strategy.configure_round(2, [0, 1])
    # Execute
    arrive(server, 1, uplink(2.0, 1), state=1)
    arrive(server, 2, uplink(6.0, 1), state=0)  # stale: FederatedScope keeps its payload
    stale = server.staled_msg_buffer
    feedback = [server.msg_buffer["train"][1][1]] + [content for _, _, content in stale]
    result = ProtocolAggregator.aggregate(SimpleNamespace(server=server, names={}), {
        "staleness": [(1, 0), (2, 1)], "client_feedback": feedback})
    # Assert
    assert feedback[0][1] is FOLDED and feedback[1][1] is not FOLDED
    assert torch.equal(result[A], torch.full((2, 3), 4.0))
    assert server.rounds[2]["accepted"] == 2
