"""The client side of the Flower host: a Flower ``ClientApp`` that trains one fs_gmfl client per message.

Every downlink carries the run's resolved configuration (YAML text and its
digest) beside the fs_gmfl :class:`~fs_gmfl.core.message.Message`, so a node
needs no file of its own: :class:`ClientRuntime` builds the model, the data
and the method from it exactly as the embedded simulator does, once per
process and configuration (Flower's simulation engine keeps its Ray actors;
a deployed SuperNode starts a fresh ``flwr-clientapp`` process per message).

The node's partition (``partition-id`` in its node config; the simulation
engine numbers its virtual nodes 0..N-1) is the fs_gmfl client id: it picks
the data shard, and a downlink addressed to another client id is refused.
What a client keeps between rounds lives in the node's ``context.state``
(Flower keeps it per node across messages): the method's per-client state
(e.g. GMFL's cached mask under ``gmfl.downlink: stateful_sync``) and what the
client's model holds beyond the adapter (:meth:`ClientAlgorithm.host_state_dict`,
e.g. FedKRSO's synced weights and their version). One process may serve several
nodes in turn, so the model is brought to the node's own state first.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict
from flwr.app import Message as FlowerMessage

from fs_gmfl.config.fields import build
from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.adapter import adapter_state
from fs_gmfl.core.protocol import TrainStats
from fs_gmfl.errors import InputError
from fs_gmfl.hosts.common.data import FederatedData, federated_data_for
from fs_gmfl.hosts.common.models import AdapterVariants, build_backbone, choose_device, load_tokenizer, prepare_for_training
from fs_gmfl.hosts.flower.records import CONFIG, METRICS, message_content, message_of, state_from_records, state_records
from fs_gmfl.hosts.sim.training import train_local
from fs_gmfl.methods import Method, MethodContext, build_method, spec_of

logger = logging.getLogger(__name__)

#: ConfigRecord entries of a downlink.
CFG_TEXT, CFG_DIGEST, ROUND, CLIENT = "cfg", "cfg-digest", "round", "client"
#: MetricRecord entries of a reply.
NUM_EXAMPLES, STEPS, MEAN_LOSS, STEP_SECONDS, TRAIN_SECONDS = (
    "num-examples", "steps", "mean-loss", "step-seconds", "train-seconds")
#: context.state prefixes.
CLIENT_STATE, HOST_STATE = "fs_gmfl.client", "fs_gmfl.host"


def config_digest(text: str) -> str:
    """Short digest of a configuration's YAML text (the key of a process's cached runtime)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def config_from_text(text: str) -> RunConfig:
    """The :class:`RunConfig` of a downlink's YAML text (validated as any configuration)."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise InputError("the downlink's configuration is not a YAML mapping")
    return build(RunConfig, data)


def partition_of(context: Context) -> int:
    """The node's partition id (``partition-id`` of its node config), checked against ``num-partitions``."""
    config = context.node_config
    if "partition-id" not in config:
        raise InputError("the node has no 'partition-id' in its node config (start it with --node-config "
                         "\"partition-id=<i> num-partitions=<N>\")")
    pid = config["partition-id"]
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        raise InputError(f"the node's partition-id {pid!r} is not a non-negative integer")
    return pid


@dataclass
class ClientRuntime:
    """One process's model, data and method for one configuration."""

    cfg: RunConfig
    data: FederatedData
    model: torch.nn.Module
    method: Method
    device: torch.device
    initial_backbone: dict[str, torch.Tensor]
    holder: int | None = None  # the node whose host state the model holds now

    @classmethod
    def build(cls, cfg: RunConfig) -> ClientRuntime:
        """Data, model and method built as the simulator builds them (same seeds, same shards)."""
        torch.set_num_threads(cfg.flower.threads_per_client(cfg.federate.client_num))
        device = choose_device(cfg)
        data = federated_data_for(cfg, load_tokenizer(cfg))
        backbone = build_backbone(cfg, cfg.model.num_labels or data.num_labels)
        model = prepare_for_training(backbone.model, cfg, device)
        variants = AdapterVariants(model, cfg, backbone.target_modules)
        method = build_method(MethodContext(cfg, adapter_state(model), variants, model=model))
        initial = {}
        if spec_of(cfg.method).trains_backbone:  # the weights a node with no state of its own starts from
            initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(cfg, data, model, method, device, initial)

    def switch_to(self, node: int, host_state: dict[str, Any] | None) -> None:
        """Bring the model to what ``node``'s model holds (its saved host state, or the initial backbone)."""
        if self.holder == node:
            return
        client = self.method.client
        if self.initial_backbone:
            self.model.load_state_dict(self.initial_backbone)
            client.load_host_state_dict(self.model, {"version": 0})
        if host_state:
            client.load_host_state_dict(self.model, host_state)
        self.holder = node

    def fit(self, rnd: int, client_id: int, downlink: Any, client_state: dict[str, Any]) -> tuple[Any, TrainStats]:
        """Prepare, train and finish one client as the simulator does; the uplink and the training stats."""
        client = self.method.client
        plan = client.prepare(self.model, downlink, client_state)
        stats = train_local(plan, self.data.client_data(client_id), self.cfg, rnd=rnd, client_id=client_id,
                            device=self.device)
        return client.finish(plan, stats, client_state), stats


_RUNTIMES: dict[str, ClientRuntime] = {}


def runtime_for(text: str, digest: str) -> ClientRuntime:
    """The process's runtime of this configuration (built on first use; one kept at a time)."""
    if digest != config_digest(text):
        raise InputError("the downlink's configuration does not match its digest")
    if digest not in _RUNTIMES:
        _RUNTIMES.clear()
        _RUNTIMES[digest] = ClientRuntime.build(config_from_text(text))
    return _RUNTIMES[digest]


def train_message(msg: FlowerMessage, context: Context) -> FlowerMessage:
    """Handle one ``train`` message: decode, check the address, train, reply with the uplink and metrics."""
    started = time.perf_counter()
    config = msg.content[CONFIG]
    client_id, rnd = int(config[CLIENT]), int(config[ROUND])
    node = partition_of(context)
    if client_id != node:
        raise InputError(f"downlink for client {client_id} reached the node of partition {node}")
    runtime = runtime_for(str(config[CFG_TEXT]), str(config[CFG_DIGEST]))
    downlink = message_of(msg.content)
    run_key = str(config[CFG_DIGEST])  # a node's state belongs to one run configuration
    client_state = state_from_records(context.state, f"{CLIENT_STATE}.{run_key}") or {}
    runtime.switch_to(node, state_from_records(context.state, f"{HOST_STATE}.{run_key}"))
    uplink, stats = runtime.fit(rnd, client_id, downlink, client_state)
    for prefix, state in ((CLIENT_STATE, client_state),
                          (HOST_STATE, runtime.method.client.host_state_dict(runtime.model))):
        for key, record in state_records(state, f"{prefix}.{run_key}").items():
            context.state[key] = record
    metrics = MetricRecord({NUM_EXAMPLES: int(stats.num_samples), STEPS: int(stats.steps),
                            MEAN_LOSS: float(stats.mean_loss), STEP_SECONDS: [float(s) for s in stats.step_seconds],
                            TRAIN_SECONDS: time.perf_counter() - started})
    return FlowerMessage(message_content(uplink, **{METRICS: metrics}), reply_to=msg)


def query_message(msg: FlowerMessage, context: Context) -> FlowerMessage:
    """Answer the server's ``query``: the node's partition id and partition count.

    A query that carries the run's configuration (the server sends it where
    client processes outlive a message: Flower's simulation engine) also builds
    this process's runtime first, so model and data are ready before round 1
    instead of inside it. A runtime that cannot be built is only logged here:
    the partition is still answered, and the first ``train`` message reports
    the error as its reply.
    """
    asked = msg.content[CONFIG] if CONFIG in msg.content else {}
    if CFG_TEXT in asked and CFG_DIGEST in asked:
        try:
            runtime_for(str(asked[CFG_TEXT]), str(asked[CFG_DIGEST]))
        except Exception as err:  # noqa: BLE001 - reported by the first train message, which builds it again
            logger.warning("flower: could not prepare the client runtime: %s", err)
    config = context.node_config
    partitions = config.get("num-partitions", -1)
    return FlowerMessage(RecordDict({CONFIG: ConfigRecord({"partition-id": partition_of(context),
                                                           "num-partitions": int(partitions)})}), reply_to=msg)


def make_client_app() -> Any:
    """The ``ClientApp``: ``train`` messages train a client, ``query`` messages report the node's partition."""
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(train_message)
    app.query()(query_message)
    return app
