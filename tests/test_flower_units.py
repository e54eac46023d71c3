"""The Flower host's parts without Flower's engines: records, node directory, transport, apps, configuration, CLI."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flower_helpers import needs_flower

from fs_gmfl.cli import main
from fs_gmfl.core.message import Message, pack_bits, samples_tensor
from fs_gmfl.errors import ConfigError, InputError, RunStopped

pytestmark = needs_flower
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_identity():
    """Flower builds messages only inside a run: give this process one for the test."""
    from flwr.supercore.task_identity import TaskIdentity

    before = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


# -- records -----------------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_travels_exactly(dtype):
    from fs_gmfl.hosts.flower.records import from_array, to_array

    t = (torch.randn(3, 5) * 100).to(dtype) if dtype != torch.bool else torch.rand(3, 5) > 0.5
    array = to_array(t)
    assert array.dtype == str(dtype).removeprefix("torch.") and array.shape == (3, 5)
    assert len(array.data) == t.numel() * t.element_size()  # raw bytes: no pickle, no numpy header
    back = from_array(array, name="t")
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8) if dtype == torch.bool else back,
                                               t.view(torch.uint8) if dtype == torch.bool else t)


def test_message_round_trip_keeps_bytes_and_bits():
    from fs_gmfl.hosts.flower.records import message_content, message_of

    msg = Message({"a.lora_A": torch.randn(4, 8).bfloat16(), "head": torch.randn(2)},
                  {"num_samples": samples_tensor(12), "mask": pack_bits([1, 0, 1, 1]), "seeds": torch.tensor([3, 9])})
    back = message_of(message_content(msg))
    assert back.nbytes == msg.nbytes == 4 * 8 * 2 + 2 * 4 + 8 + 1 + 16
    for part in ("tensors", "control"):
        ours, theirs = getattr(msg, part), getattr(back, part)
        assert list(ours) == list(theirs)
        assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)


@pytest.mark.parametrize("field, value, match", [
    ("stype", "numpy.ndarray", "serialisation type"),
    ("dtype", "complex64", "unsupported dtype"),
    ("dtype", "object", "unsupported dtype"),
    ("shape", (2, -1), "invalid shape"),
    ("shape", tuple([1] * 9), "invalid shape"),
    ("shape", (2, 2**40), "invalid shape"),
    ("data", b"\x00" * 7, "carries 7 bytes"),
])
def test_malformed_array_is_refused_before_a_tensor_is_built(field, value, match):
    from flwr.app import Array

    from fs_gmfl.hosts.common.tensor_wire import WireError
    from fs_gmfl.hosts.flower.records import STYPE, from_array

    fields = {"dtype": "float32", "shape": (2, 2), "stype": STYPE, "data": b"\x00" * 16, field: value}
    with pytest.raises(WireError, match=match):
        from_array(Array(**fields), name="x")


def test_sample_count_must_be_one_int64():
    from fs_gmfl.hosts.common.tensor_wire import WireError
    from fs_gmfl.hosts.flower.records import message_content, message_of

    for forged in (torch.tensor(3.0), torch.tensor([3, 4]), torch.tensor(3, dtype=torch.int32)):
        with pytest.raises(WireError, match="num_samples"):
            message_of(message_content(Message({}, {"num_samples": forged})))


def test_record_dict_with_unknown_or_missing_records_is_refused():
    from flwr.app import ConfigRecord, RecordDict

    from fs_gmfl.hosts.common.tensor_wire import WireError
    from fs_gmfl.hosts.flower.records import message_content, message_of

    content = message_content(Message({"a": torch.ones(1)}))
    content["evil"] = ConfigRecord({"x": 1})
    with pytest.raises(WireError, match="unknown record 'evil'"):
        message_of(content)
    with pytest.raises(WireError, match="'control' is missing"):
        message_of(RecordDict({"tensors": content["tensors"]}))
    with pytest.raises(WireError, match="not a record dict"):
        message_of({"tensors": 1})


def test_client_state_round_trip():
    from fs_gmfl.hosts.flower.records import state_from_records, state_records

    state = {"version": 3, "weights": {"w": torch.randn(2, 3)}, "flags": [True, False], "name": "x"}
    records = state_records(state, "p")
    back = state_from_records(records, "p")
    assert back["version"] == 3 and back["flags"] == [True, False] and back["name"] == "x"
    assert torch.equal(back["weights"]["w"], state["weights"]["w"])
    assert state_from_records(records, "other") is None


# -- node directory and transport over a fake Grid ----------------------------------------------------------------
class FakeGrid:
    """Nodes answer queries with their partition and train messages with a scripted reply (or never)."""

    def __init__(self, partitions: dict[int, tuple[int, int]]) -> None:
        self.partitions = partitions  # node id -> (partition, num-partitions)
        self.pushed: list = []
        self.replies: dict[str, SimpleNamespace] = {}
        self.silent: set[int] = set()
        self.failing: set[int] = set()
        self.pull_order: list[str] | None = None

    def get_node_ids(self):
        return list(self.partitions)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            mid = f"m{len(self.pushed)}"
            self.pushed.append(message)
            ids.append(mid)
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            self.replies[mid] = self.answer(mid, node, message)
        return ids

    def answer(self, mid, node, message):
        from flwr.app import ConfigRecord, RecordDict

        from fs_gmfl.hosts.flower.records import METRICS, message_content

        meta = SimpleNamespace(reply_to_message_id=mid, src_node_id=node)
        if node in self.failing:
            return SimpleNamespace(metadata=meta, has_error=lambda: True, error=SimpleNamespace(reason="boom"))
        if message.metadata.message_type == "query":
            pid, num = self.partitions[node]
            content = RecordDict({"config": ConfigRecord({"partition-id": pid, "num-partitions": num})})
        else:
            from flwr.app import MetricRecord

            pid = self.partitions[node][0]
            content = message_content(Message({"w": torch.full((2,), float(pid))}, {"num_samples": samples_tensor(5)}),
                                      **{METRICS: MetricRecord({"step-seconds": [0.5, 0.25]})})
        return SimpleNamespace(metadata=meta, has_error=lambda: False, content=content)

    def pull_messages(self, ids):
        order = [*(self.pull_order or []), *self.replies]  # pull_order first, then the rest as they came
        wanted = list(dict.fromkeys(i for i in order if i in ids and i in self.replies))
        return [self.replies.pop(i) for i in wanted]


def test_node_directory_maps_partitions_and_ignores_foreign_nodes(run_identity):
    from fs_gmfl.hosts.flower.server import NodeDirectory

    grid = FakeGrid({11: (0, 3), 12: (1, 3), 13: (5, 3), 14: (2, 4)})
    nodes = NodeDirectory(grid, 3)
    nodes.refresh()
    assert nodes.node_of == {0: 11, 1: 12}  # partition 5 out of range, node 14 from a 4-partition federation
    replaced = []
    nodes.on_replaced = replaced.append
    grid.partitions = {11: (0, 3), 22: (1, 3)}  # node 12 died, partition 1 restarted as node 22
    nodes.refresh()
    assert nodes.node_of == {0: 11, 1: 22} and replaced == [1]


def test_no_node_at_all_stops_the_run(run_identity):
    from fs_gmfl.hosts.flower.server import NodeDirectory

    with pytest.raises(RunStopped, match="flower.node_wait_s"):
        NodeDirectory(FakeGrid({}), 2).wait_for_all(0.01)


def test_queries_carry_the_configuration_only_when_asked_to(run_identity):
    from fs_gmfl.hosts.flower.client import CFG_DIGEST, CFG_TEXT
    from fs_gmfl.hosts.flower.server import NodeDirectory

    grid = FakeGrid({11: (0, 2), 12: (1, 2)})
    NodeDirectory(grid, 2).refresh()
    assert [dict(m.content["config"]) for m in grid.pushed] == [{"ask": "partition"}] * 2
    NodeDirectory(grid, 2, prepare={CFG_TEXT: "seed: 3\n", CFG_DIGEST: "abc"}).refresh()
    assert [dict(m.content["config"]) for m in grid.pushed[2:]] == [
        {"ask": "partition", CFG_TEXT: "seed: 3\n", CFG_DIGEST: "abc"}] * 2


def test_only_the_simulation_engine_grid_gets_prepared_clients():
    """Its grid class is what the server checks: a rename in Flower must fail here, not silently stop preparing."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fs_gmfl.hosts.flower.server import clients_outlive_messages

    assert clients_outlive_messages(object.__new__(InMemoryGrid))
    assert not clients_outlive_messages(FakeGrid({}))


def query_of(config: dict, partition: int = 1):
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.app import Message as FlowerMessage

    from fs_gmfl.hosts.flower.client import query_message

    context = Context(run_id=7, node_id=3, node_config={"partition-id": partition, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    message = FlowerMessage(RecordDict({"config": ConfigRecord(config)}), dst_node_id=3, message_type="query")
    return dict(query_message(message, context).content["config"])


def test_a_query_with_the_configuration_builds_the_runtime_once(run_identity, monkeypatch):
    from fs_gmfl.hosts.flower import client as flower_client

    built = []
    monkeypatch.setattr(flower_client, "_RUNTIMES", {})
    monkeypatch.setattr(flower_client.ClientRuntime, "build", classmethod(lambda cls, cfg: built.append(cfg) or "rt"))
    text = "seed: 3\n"
    asked = {"ask": "partition", flower_client.CFG_TEXT: text, flower_client.CFG_DIGEST: flower_client.config_digest(text)}
    assert query_of({"ask": "partition"}) == {"partition-id": 1, "num-partitions": 2} and built == []
    assert query_of(asked) == query_of(asked) == {"partition-id": 1, "num-partitions": 2}
    assert len(built) == 1 and built[0].seed == 3 and flower_client._RUNTIMES == {asked[flower_client.CFG_DIGEST]: "rt"}


def test_a_runtime_that_cannot_be_built_still_answers_the_partition(run_identity, caplog):
    from fs_gmfl.hosts.flower.client import CFG_DIGEST, CFG_TEXT

    answer = query_of({"ask": "partition", CFG_TEXT: "seed: 3\n", CFG_DIGEST: "forged"}, partition=0)
    assert answer == {"partition-id": 0, "num-partitions": 2}
    assert "could not prepare the client runtime: the downlink's configuration does not match its digest" in caplog.text


def transport_for(grid, tiny, *overrides):
    from fs_gmfl.hosts.flower.server import GridTransport, NodeDirectory

    nodes = NodeDirectory(grid, 3)
    nodes.refresh()
    seen = []
    transport = GridTransport(grid, nodes, tiny("federate.client_num", "3", *overrides),
                              on_metrics=lambda cid, m: seen.append((cid, list(m["step-seconds"]))))
    return transport, seen


def downlinks():
    return {c: Message({"w": torch.zeros(2)}) for c in (0, 1, 2)}


def test_transport_yields_replies_and_reports_lost_clients(run_identity, tiny):
    grid = FakeGrid({11: (0, 3), 12: (1, 3), 13: (2, 3)})
    transport, seen = transport_for(grid, tiny, "flower.round_timeout_s", "0.3")
    grid.silent, grid.failing = {12}, {13}  # after they said which partition they hold
    replies = list(transport.replies(1, downlinks()))
    assert [r.client_id for r in replies] == [0] and torch.equal(replies[0].message.tensors["w"], torch.zeros(2))
    assert transport.lost == {1: "no reply within flower.round_timeout_s = 0.3 s", 2: "node error: boom"}
    assert seen == [(0, [0.5, 0.25])]
    assert [m.content["config"]["client"] for m in grid.pushed[-3:]] == [0, 1, 2]


def test_client_id_order_holds_early_replies(run_identity, tiny):
    grid = FakeGrid({11: (0, 3), 12: (1, 3), 13: (2, 3)})
    transport, _ = transport_for(grid, tiny, "flower.fold_order", "client_id")
    first_push = len(grid.pushed)
    grid.pull_order = [f"m{first_push + i}" for i in (2, 0, 1)]  # client 2 answers first
    assert [r.client_id for r in transport.replies(1, downlinks())] == [0, 1, 2]
    transport, _ = transport_for(grid, tiny)  # arrival order
    first_push = len(grid.pushed)
    grid.pull_order = [f"m{first_push + i}" for i in (2, 0, 1)]
    assert [r.client_id for r in transport.replies(1, downlinks())] == [2, 0, 1]


def test_reply_from_another_node_is_refused(run_identity, tiny):
    """Replies are matched by message id and checked against the sampled client's node: a node cannot answer for
    a client it does not hold (or for one the round did not sample: it never received that client's message)."""
    grid = FakeGrid({11: (0, 3), 12: (1, 3), 13: (2, 3)})
    transport, _ = transport_for(grid, tiny)
    answer = grid.answer

    def impostor(mid, node, message):
        reply = answer(mid, node, message)
        if node == 12:
            reply.metadata.src_node_id = 13
        return reply

    grid.answer = impostor
    assert [r.client_id for r in transport.replies(1, downlinks())] == [0, 2]
    assert transport.malformed == {1: "reply from node 13, not the client's node"}


def test_client_without_node_is_lost_without_sending(run_identity, tiny):
    grid = FakeGrid({11: (0, 3), 13: (2, 3)})
    transport, _ = transport_for(grid, tiny)
    before = len(grid.pushed)
    assert [r.client_id for r in transport.replies(1, downlinks())] == [0, 2]
    assert transport.lost == {1: "no node holds its partition"} and len(grid.pushed) - before == 2


# -- configuration, apps, command line ----------------------------------------------------------------------------
def test_parallelism_arithmetic(tiny, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    cfg = tiny("federate.client_num", "3")
    assert cfg.flower.parallel_clients(3) == 3 and cfg.flower.threads_per_client(3) == 2
    cfg = tiny("flower.client_cpus", "2", "flower.max_parallel", "0")
    assert cfg.flower.parallel_clients(10) == 4 and cfg.flower.threads_per_client(10) == 2
    cfg = tiny("flower.max_parallel", "1", "flower.client_threads", "3")
    assert cfg.flower.parallel_clients(10) == 1 and cfg.flower.threads_per_client(10) == 3


@pytest.mark.parametrize("key, value", [("flower.max_parallel", "-1"), ("flower.client_cpus", "0"),
                                        ("flower.client_cpus", "nan"), ("flower.round_timeout_s", "inf"),
                                        ("flower.fold_order", "random"), ("flower.client_threads", "1.5"),
                                        ("flower.node_wait_s", "soon"), ("flower.nope", "1")])
def test_bad_flower_value_is_one_line_and_exit_2(key, value, capsys):
    code = main(["flower-run", "--cfg", str(ROOT / "yaml_configs" / "quickstart.yaml"), key, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and key in err[0], err


def test_what_the_flower_host_refuses(tiny):
    from fs_gmfl.hosts.flower.server import check_flower_config

    with pytest.raises(ConfigError, match="faults"):
        check_flower_config(tiny("faults.nan_clients", "[1]"))
    with pytest.raises(ConfigError, match="flower.ray_temp_dir"):
        check_flower_config(tiny("flower.ray_temp_dir", "/tmp/" + "x" * 40))
    with pytest.raises(ConfigError, match="stateful_sync"):
        check_flower_config(tiny("gmfl.use", "True", "gmfl.downlink", "stateful_sync"))


def test_without_flower_the_commands_say_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "fs_gmfl.hosts.flower.app", None)
    code = main(["flower-run", "--cfg", str(ROOT / "yaml_configs" / "quickstart.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "install.sh --flower" in err[0]


def test_flower_app_folder(tmp_path, capsys):
    from fs_gmfl.hosts.flower.app import APP_CONFIG, request_from_run_config

    folder = tmp_path / "app"
    assert main(["flower-app", "--cfg", str(ROOT / "yaml_configs" / "quickstart.yaml"), "--out", str(folder),
                 "federate.client_num", "3", "federate.sample_client_num", "2", "outdir", "relative_out"]) == 0
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    components = project["tool"]["flwr"]["app"]["components"]
    module = ast.parse((folder / "fs_gmfl_app.py").read_text())
    assigned = {t.id for n in module.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert {v.split(":")[1] for v in components.values()} <= assigned  # what flwr's static check looks for
    assert project["tool"]["flwr"]["app"]["config"] == {"cfg": APP_CONFIG, "overrides": "", "resume": False,
                                                         "overwrite": False}
    request = request_from_run_config(folder, {"cfg": APP_CONFIG, "overrides": "federate.total_round_num 7",
                                               "resume": True})
    assert request.cfg.federate.client_num == 3 and request.cfg.federate.total_round_num == 7 and request.resume
    assert Path(request.cfg.outdir).is_absolute() and request.cfg.outdir.endswith("relative_out")
    with pytest.raises(InputError, match="KEY VALUE pairs"):
        request_from_run_config(folder, {"overrides": "federate.total_round_num"})
    with pytest.raises(ConfigError, match="resume"):
        request_from_run_config(folder, {"resume": "yes"})
    with pytest.raises(ConfigError, match="federate.nope"):
        request_from_run_config(folder, {"overrides": "federate.nope 1"})
