"""FederatedScope server, client and aggregator that move fs_gmfl messages.

Selected by ``federate.method`` (``fedit``, ``ffa_lora`` and every other method
registered in :mod:`fs_gmfl.methods`; FederatedScope's own ``fedavg`` stays
its own). They only translate: the server asks the method's
:class:`~fs_gmfl.core.protocol.Strategy` for one downlink per sampled client
(``configure_round``) and folds each uplink into the strategy's streaming
aggregation as its ``model_para`` message arrives
(:meth:`FsGmflServer.callback_funcs_model_para`), leaving FederatedScope's
buffer only a placeholder per client so that its round bookkeeping
(``check_and_move_on``, staleness, evaluation) runs unchanged; FederatedScope's
aggregation step (:class:`ProtocolAggregator`, installed as ``self.aggregator``
and ``self.aggregators``) folds any stale message left and finishes the
round. The client hands its downlink to the
:class:`~fs_gmfl.hosts.fs.trainer.FsGmflTrainer`, which runs the method's
:class:`~fs_gmfl.core.protocol.ClientAlgorithm` through hooks.

Payloads travel as wire dicts (:mod:`fs_gmfl.hosts.fs.wire`) in
FederatedScope's ``model_para`` and ``evaluate`` messages, so FederatedScope's
trainable-only state dict never decides what is sent. Every payload's exact
byte count (``numel * element_size`` of its tensors) is recorded in a
:class:`~fs_gmfl.core.comm.CommLedger` (written as ``comm_log.jsonl`` and
``summary.json`` in the run directory) and reported to FederatedScope's
monitor: uploads by the sender, downloads by the receiver (in standalone
mode FederatedScope's runner counts downloads itself through
:meth:`FsGmflMessage.count_bytes`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from federatedscope.core.aggregators import ClientsAvgAggregator
from federatedscope.core.message import Message as FsMessage
from federatedscope.core.workers import Client, Server
from torch import Tensor, nn

from fs_gmfl.config.advice import log_config_warnings
from fs_gmfl.core.adapter import adapter_parameters, adapter_state, load_model_tensors, model_tensor_map
from fs_gmfl.core.comm import CommLedger
from fs_gmfl.core.message import Reply, total_bytes
from fs_gmfl.core.protocol import ClientAlgorithm, RoundAggregation, RoundReport
from fs_gmfl.core.uplinks import UplinkPolicy
from fs_gmfl.hosts.common.batches import sample_clients
from fs_gmfl.hosts.common.rundir import write_json_atomic
from fs_gmfl.hosts.common.store import ClientStateStore
from fs_gmfl.hosts.fs import wire
from fs_gmfl.hosts.fs.builders import model_provider_for, trains_in_half
from fs_gmfl.hosts.fs.config import SWITCHES, to_run_config
from fs_gmfl.hosts.fs.method_state import load_method_state, save_method_state, state_path
from fs_gmfl.hosts.fs.resilience import UNDELIVERED, ResilientClient, ResilientServer
from fs_gmfl.hosts.fs.trainer import Assignment, inner_model
from fs_gmfl.methods import Method, MethodContext, build_method

logger = logging.getLogger("federatedscope." + __name__)


class FsGmflMessage(FsMessage):
    """A FederatedScope message carrying an fs_gmfl payload of known exact size.

    Args:
        nbytes: bytes of the payload's tensors (``Message.nbytes``).
    """

    def __init__(self, *args: Any, nbytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nbytes = int(nbytes)

    def count_bytes(self) -> tuple[int, int]:
        """Exact bytes per receiver and in all, instead of FederatedScope's object-size estimate."""
        receivers = len(self.receiver) if isinstance(self.receiver, list) else 1
        return self.nbytes, self.nbytes * receivers


def build_fs_method(fs_cfg: Any, model: nn.Module) -> Method:
    """The fs_gmfl method of a FederatedScope config, its initial adapter (and targeted weights) from ``model``."""
    run_cfg = to_run_config(fs_cfg)
    inner = inner_model(model)
    return build_method(MethodContext(run_cfg, adapter_state(inner), model_provider_for(fs_cfg, run_cfg),
                                      model=inner))


def state_dict_names(model: nn.Module, keys: Any = None) -> dict[str, str]:
    """Adapter key (or, for backbone weights, parameter name) -> parameter name in ``model``'s state dict.

    ``keys`` defaults to every adapter tensor of ``model``.
    """
    inner = inner_model(model)
    names = {id(p): name for name, p in inner.named_parameters()}
    params = adapter_parameters(inner) if keys is None else model_tensor_map(inner, keys)
    return {key: names[id(p)] for key, p in params.items()}


def train_only(model: nn.Module, keys: Any) -> None:
    """``requires_grad`` on exactly the tensors ``keys`` name, so FederatedScope's trainable-only state dict
    (what it checkpoints, merges and evaluates) holds exactly a backbone method's global tensors."""
    inner = inner_model(model)
    ids = {id(p) for p in model_tensor_map(inner, keys).values()}
    for p in inner.parameters():
        p.requires_grad_(id(p) in ids)


@contextlib.contextmanager
def values_kept(model: nn.Module, keys: Any) -> Iterator[None]:
    """Put the tensors ``keys`` name in ``model`` back to their current values on exit."""
    params = model_tensor_map(inner_model(model), keys)
    saved = {k: p.detach().clone() for k, p in params.items()}
    try:
        yield
    finally:
        load_model_tensors(inner_model(model), saved)


class FsGmflServer(ResilientServer, Server):
    """FederatedScope server driving an fs_gmfl :class:`~fs_gmfl.core.protocol.Strategy`."""

    def __init__(self, ID: int = -1, state: int = 0, config: Any = None, data: Any = None, model: Any = None,
                 client_num: int = 5, total_round_num: int = 10, device: str = "cpu", strategy: Any = None,
                 unseen_clients_id: Any = None, **kwargs: Any) -> None:
        super().__init__(ID, state, config, data, model, client_num, total_round_num, device, strategy,
                         unseen_clients_id, **kwargs)
        self.method = build_fs_method(config, self.models[0])
        run_cfg = to_run_config(config)
        self.seed = run_cfg.seed
        self.warnings = log_config_warnings(run_cfg, logger)
        self.ledger = CommLedger()
        self.rounds: dict[int, dict[str, Any]] = {}
        self.rejections: dict[str, int] = {}
        self.accepted_total = 0
        self.mostly_rejected_rounds: list[int] = []
        self.wire_dtype = wire_dtype_of(config, self.models[0])
        expect_global_dtype(self.method.strategy)
        self.open_round: OpenRound | None = None
        self.evaluation = {"broadcasts": 0, "bytes": 0}
        _create_parent(config.federate.save_to)
        self._restore_method_state(config.federate.restore_from)
        self.hold_global()
        SERVERS.append(self)
        self.aggregator = ProtocolAggregator(self)
        self.aggregators = [self.aggregator]
        for change in SWITCHES:
            logger.info(f"fs_gmfl: {change}")
        self.init_resilience(run_cfg.fault_tolerance)

    def _restore_method_state(self, checkpoint: str) -> None:
        """With ``federate.restore_from``: load the strategy state saved beside it and continue after its round.

        FederatedScope itself loads only the model and restarts at round 0;
        with the method state the run continues at the saved round + 1, so
        every per-round seed (sampling, dropout, batch schedule) and the
        method's schedule (e.g. GMFL's refresh period) carry on.
        """
        if not checkpoint or not Path(checkpoint).exists():
            return
        saved = load_method_state(checkpoint, method=self.method.strategy.name)
        if saved is None:
            logger.warning(f"fs_gmfl: no method state beside {checkpoint} ({state_path(checkpoint).name}): "
                           f"only the model is restored, the method starts afresh at round 1")
            return
        rnd, state = saved
        self.method.strategy.load_state_dict(state)
        if self.method.clients_reset is not None and not self.shares_model:
            self.method.clients_reset()  # the clients' own models restart from the initial backbone
        self.state = rnd
        logger.info(f"fs_gmfl: restored the {self.method.strategy.name} state of round {rnd} from "
                    f"{state_path(checkpoint)}; continuing with round {rnd + 1}")

    @property
    def distributed(self) -> bool:
        """True in FederatedScope's distributed (gRPC) mode."""
        return self._cfg.federate.mode == "distributed"

    def hold_global(self) -> None:
        """Methods that train backbone weights: put their global tensors into this server's model and make them its
        only ``requires_grad`` tensors, so FederatedScope's trainable-only state dict (checkpoints, evaluation)
        holds exactly them. Repeated after every aggregation: standalone clients sharing the model change the
        flags of what they train (the trainer restores them as the client's ``prepare`` left them)."""
        if self.method.trains_backbone:
            train_only(self.models[0], self.method.strategy.global_adapter())
            self.method.load_global(inner_model(self.models[0]))

    @property
    def shares_model(self) -> bool:
        """True when the clients train this server's model object (standalone ``share_local_model``)."""
        return not self.distributed and bool(self._cfg.federate.share_local_model)

    def broadcast_model_para(self, msg_type: str = "model_para", sample_client_num: int = -1,
                             filter_unseen_clients: bool = True) -> None:
        """Send each sampled client its downlink (``model_para``) or everyone the global adapter (``evaluate``)."""
        if msg_type == "model_para":
            self._send_downlinks(self._receivers(sample_client_num, filter_unseen_clients))
        elif msg_type == "evaluate":
            self._send_global_adapter(msg_type, list(self.comm_manager.neighbors.keys()))
        else:
            super().broadcast_model_para(msg_type, sample_client_num, filter_unseen_clients)

    def _receivers(self, sample_client_num: int, filter_unseen_clients: bool) -> list[int]:
        """The round's receivers.

        With FederatedScope's ``uniform`` sampler and no unseen clients, the
        sample is drawn from fs_gmfl's per-round seeded generator (the same
        uniform distribution), so the participants of round ``r`` depend only
        on the seed: identical in the simulator, in standalone and in
        distributed FederatedScope runs. Otherwise FederatedScope's sampler
        decides, as in its own broadcast.
        """
        if sample_client_num > 0 and self._cfg.federate.sampler == "uniform" and not self.unseen_clients_id:
            receivers = [c + 1 for c in sample_clients(self.client_num, sample_client_num, seed=self.seed,
                                                       rnd=self.state + 1)]
            self.sampler.change_state(receivers, "working")
            return receivers
        if filter_unseen_clients:
            self.sampler.change_state(self.unseen_clients_id, "unseen")
        if sample_client_num > 0:
            receivers = [int(r) for r in self.sampler.sample(size=sample_client_num)]
        else:
            receivers = [int(r) for r in self.comm_manager.neighbors.keys()]
            self.sampler.change_state(receivers, "working")
        if filter_unseen_clients:
            self.sampler.change_state(self.unseen_clients_id, "seen")
        return receivers

    def _send_downlinks(self, sampled: list[int]) -> None:
        """Each sampled client's downlink; in distributed mode not to clients known to be gone or still busy
        (:meth:`~fs_gmfl.hosts.fs.resilience.ResilientServer.available`), which the round then goes without."""
        rnd = self.state + 1
        strategy = self.method.strategy
        receivers, lost = self.available(sampled)
        self.rounds[rnd] = {"round": rnd, "clients": sorted(r - 1 for r in receivers), **strategy.round_metrics()}
        downlinks = strategy.configure_round(rnd, sorted(r - 1 for r in receivers))
        for receiver in receivers:
            if not self.send_downlink(rnd, receiver, downlinks[receiver - 1]):
                lost[receiver] = UNDELIVERED
        if self.distributed:  # kept for a client that restarts during the round
            self.round_downlinks = {r: downlinks[r - 1] for r in receivers}
        self.watch("train", self.state, sampled, lost)

    def send_downlink(self, rnd: int, receiver: int, message: Any) -> bool:
        """Send (and count) one client's downlink of round ``rnd``; False if it could not be delivered."""
        self.ledger.record(rnd, receiver - 1, "downlink", message)
        return not self._send(FsGmflMessage(msg_type="model_para", sender=self.ID, receiver=[receiver],
                                            state=self.state, timestamp=self.cur_timestamp,
                                            content=wire.encode(message, wire.DOWNLINK), nbytes=message.nbytes))

    def _send_global_adapter(self, msg_type: str, receivers: list[int]) -> None:
        """Broadcast the global adapter for evaluation (counted apart from training traffic in summary.json)."""
        adapter = self.method.strategy.global_adapter()
        asked, lost = self.available(receivers) if msg_type == "evaluate" else (receivers, {})
        message = FsGmflMessage(msg_type=msg_type, sender=self.ID, receiver=asked,
                                state=min(self.state - 1, self.total_round_num), timestamp=self.cur_timestamp,
                                content=wire.encode_tensors(adapter), nbytes=total_bytes(adapter))
        lost.update(dict.fromkeys(self._send(message), UNDELIVERED))
        if msg_type == "evaluate":
            self.watch("eval", message.state, receivers, lost)
        self.evaluation["broadcasts"] += 1
        self.evaluation["bytes"] += message.count_bytes()[1]
        self.write_outputs()

    def terminate(self, msg_type: str = "finish") -> None:
        """End the course as FederatedScope does, but send the global adapter as a wire payload.

        FederatedScope's own ``terminate`` sends the state dict, which its gRPC
        encoding turns into one protobuf value per float: minutes for a real
        model's adapter (SmolLM2's LoRA r=4 has 230400 floats), during which the
        server and clients hang. The wire payload is one string per tensor; the
        clients' trainer loads it as it loads an evaluation broadcast. Like
        FederatedScope's, this message is not added to the server's upload bytes.
        In distributed mode it is sent once.
        """
        self.is_finish = True
        if not self.finish_once():
            return
        adapter = self.method.strategy.global_adapter()
        self._monitor.finish_fl()
        self.comm_manager.send(FsGmflMessage(msg_type=msg_type, sender=self.ID,
                                             receiver=list(self.comm_manager.neighbors.keys()), state=self.state,
                                             timestamp=self.cur_timestamp, content=wire.encode_tensors(adapter),
                                             nbytes=total_bytes(adapter)))

    def _send(self, message: FsGmflMessage) -> list[int]:
        """Send and count ``message``; the receivers it could not be delivered to (distributed mode)."""
        undelivered = self.comm_manager.send(message)
        self._monitor.track_upload_bytes(message.count_bytes()[1])
        return list(undelivered or [])

    # -- streaming aggregation -----------------------------------------------------------------
    def callback_funcs_model_para(self, message: FsMessage) -> Any:
        """Fold an uplink of the current round into the strategy on arrival, then let FederatedScope buffer a
        placeholder in its place (``(sample count, FOLDED)``) and do its bookkeeping as usual.

        So the server holds the global state, the strategy's running sums and
        the one message being handled, whatever the number of clients. A
        stale message (from an earlier round, within
        ``federate.staleness_toleration``) is left to FederatedScope's buffer
        and folded when the round is aggregated, as before.
        """
        if not self.expects_reply(message):
            return False
        if not self.is_finish and message.state == self.state:
            message.content = self.fold_on_arrival(int(message.sender) - 1, message.content)
        return super().callback_funcs_model_para(message)

    def aggregation_of(self, rnd: int) -> OpenRound:
        """The streaming aggregation of round ``rnd``, opened on first use."""
        if self.open_round is None or self.open_round.rnd != rnd:
            strategy = self.method.strategy
            dtypes = {k: v.dtype for k, v in strategy.global_adapter().items()}
            self.open_round = OpenRound(rnd, strategy.start_aggregation(rnd), dtypes)
        return self.open_round

    def fold_on_arrival(self, cid: int, content: Any) -> Any:
        """Decode, count, cast (:func:`to_global_dtype`) and fold one uplink; FederatedScope's placeholder for it."""
        open_round = self.aggregation_of(self.state + 1)
        num_samples = content[0] if isinstance(content, (tuple, list)) and content else None
        try:
            message = wire.decode(content[1], expect=wire.UPLINK)
        except (wire.WireError, TypeError, IndexError, KeyError) as err:
            open_round.malformed[cid] = f"malformed payload: {err}"
            return num_samples, FOLDED
        self.ledger.record(open_round.rnd, cid, "uplink", message)
        if self.distributed:
            self._monitor.track_download_bytes(message.nbytes)
        reason = to_global_dtype(message, open_round.dtypes, self.wire_dtype)
        if reason:
            open_round.malformed[cid] = reason
        else:
            open_round.aggregation.add(Reply(cid, message))
        return num_samples, FOLDED

    # -- per-round record ----------------------------------------------------------------------
    def record_round(self, rnd: int, report: RoundReport) -> None:
        """Log rejections and write ``comm_log.jsonl`` / ``summary.json`` after each aggregation.

        A round in which at least half of the updates are rejected logs a
        warning with the counts and is listed in ``summary.json``
        (``rejected_updates.mostly_rejected_rounds``).
        """
        for cid, reason in report.rejected.items():
            logger.warning(f"round {rnd}: update of client {cid} rejected: {reason}")
            kind = reason.split(":")[0]
            self.rejections[kind] = self.rejections.get(kind, 0) + 1
        self.accepted_total += len(report.accepted)
        received = len(report.accepted) + len(report.rejected)
        if report.rejected and 2 * len(report.rejected) >= received:
            self.mostly_rejected_rounds.append(rnd)
            logger.warning(f"round {rnd}: {len(report.rejected)} of {received} updates rejected; "
                           f"{self.accepted_total} accepted since the start of the run")
        row = self.rounds.setdefault(rnd, {"round": rnd})
        row.update({**self.ledger.round_totals(rnd), "accepted": len(report.accepted),
                    "rejected": len(report.rejected), **report.metrics})
        self.write_outputs()

    @property
    def never_accepted(self) -> bool:
        """True when rounds were aggregated but no update was ever accepted (the global model never moved)."""
        return bool(self.rounds) and any("rejected" in r for r in self.rounds.values()) and not self.accepted_total

    def write_outputs(self) -> None:
        """The fs_gmfl view of the run in FederatedScope's run directory (bytes from the messages sent)."""
        outdir = Path(self._cfg.outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        with open(outdir / "comm_log.jsonl", "w", encoding="utf-8") as fh:
            for t in self.ledger.transfers:
                fh.write(json.dumps(t.as_row()) + "\n")
        summary = {"host": "federatedscope", "method": self.method.strategy.name,
                   "rounds": self.total_round_num, "comm": self.ledger.totals(),
                   "per_round": [self.rounds[r] for r in sorted(self.rounds)],
                   "accepted_updates": self.accepted_total,
                   "rejected_updates": {"total": sum(self.rejections.values()), "by_reason": dict(self.rejections),
                                        "mostly_rejected_rounds": list(self.mostly_rejected_rounds)},
                   "uplink_dtype": str(self.wire_dtype).removeprefix("torch."),
                   "evaluation_broadcasts": {**self.evaluation, "note": EVALUATION_NOTE},
                   "method_info": self.method.info, "warnings": self.warnings}
        write_json_atomic(outdir / "summary.json", summary)


#: how summary.json's byte counts relate to FederatedScope's monitor (system_metrics.log).
EVALUATION_NOTE = ("comm and per_round count training messages only (downlinks and uplinks, as in the simulator); "
                   "FederatedScope's monitor also counts these evaluation broadcasts of the global adapter, so the "
                   "server's total_upload_bytes = comm.downlink_bytes + evaluation_broadcasts.bytes")


def _create_parent(save_to: str) -> None:
    """Create the directory of ``federate.save_to`` (FederatedScope's torch.save does not)."""
    if save_to:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)


#: every fs_gmfl server and client of this process (the launcher reads their outcome to set the exit status).
SERVERS: list[FsGmflServer] = []
CLIENTS: list[FsGmflClient] = []


def wire_dtype_of(fs_cfg: Any, model: nn.Module) -> torch.dtype:
    """The dtype the clients train, and so upload, their floating-point tensors in.

    float16 with ``train.is_enable_half`` (FederatedScope's LLM trainer casts
    the model at every fit), otherwise the dtype of the model's adapter.
    """
    if trains_in_half(fs_cfg):
        return torch.float16
    params = adapter_parameters(inner_model(model))
    return next(iter(params.values())).dtype if params else torch.float32


def expect_global_dtype(strategy: Any) -> None:
    """Make the strategy's uplink gate expect the global tensors' dtype: this server checks each uplink against
    the clients' training dtype and casts it to that dtype (:func:`to_global_dtype`) before the strategy sees it."""
    policy = getattr(strategy, "policy", None)
    floating = [t.dtype for t in strategy.global_adapter().values() if t.is_floating_point()]
    if isinstance(policy, UplinkPolicy) and floating:
        policy.wire_dtype = floating[0]


def to_global_dtype(message: Any, reference: Mapping[str, Tensor | torch.dtype],
                    wire_dtype: torch.dtype) -> str | None:
    """Check that the uplink's adapter tensors come in the clients' training dtype, then cast them, exactly,
    to the dtype of the strategy's global tensors (which validates and aggregates them as usual).

    Args:
        message: the decoded uplink (its tensors are replaced by the cast ones).
        reference: the global tensors, or just their dtypes, by key.
        wire_dtype: the clients' training dtype.

    Returns:
        ``None``, or the rejection reason for a floating tensor in another dtype.
    """
    for key, value in list(message.tensors.items()):
        like = reference.get(key)
        if like is None or not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        if value.dtype != wire_dtype:
            return f"wrong dtype: '{key}' has dtype {value.dtype}, expected {wire_dtype} (the clients' training dtype)"
        global_dtype = like if isinstance(like, torch.dtype) else like.dtype
        if global_dtype != wire_dtype:
            message.tensors[key] = value.to(global_dtype)
    return None


#: what FederatedScope's message buffer holds for an uplink already folded on arrival.
FOLDED = "fs_gmfl:folded"


@dataclass
class OpenRound:
    """The round being aggregated: the strategy's streaming aggregation and what the host rejected itself.

    Attributes:
        rnd: the round (1-based).
        aggregation: the strategy's :class:`~fs_gmfl.core.protocol.RoundAggregation`.
        dtypes: the global tensors' dtypes (uplinks are cast to them before folding).
        malformed: client id -> why its payload never reached the strategy.
    """

    rnd: int
    aggregation: RoundAggregation
    dtypes: dict[str, torch.dtype]
    malformed: dict[int, str] = field(default_factory=dict)


class ProtocolAggregator(ClientsAvgAggregator):
    """FederatedScope aggregator that hands the uplinks to the strategy and returns the new global adapter."""

    def __init__(self, server: FsGmflServer) -> None:
        super().__init__(model=server.models[0], device=server.device, config=server._cfg)
        self.server = server
        self.names = state_dict_names(server.models[0], server.method.strategy.global_adapter())

    def save_model(self, path: str, cur_round: int = -1) -> None:
        """FederatedScope's checkpoint, plus the strategy's state beside it (:mod:`.method_state`)."""
        super().save_model(path, cur_round)
        strategy = self.server.method.strategy
        save_method_state(path, method=strategy.name, rnd=cur_round, state=strategy.state_dict())

    def aggregate(self, agg_info: dict[str, Any]) -> dict[str, Tensor]:
        """Finish the round's streaming aggregation and return the global adapter by state-dict name.

        The uplinks of the round were folded as they arrived
        (:meth:`FsGmflServer.fold_on_arrival`); a stale one still in
        FederatedScope's buffer is folded now. A payload that is not a
        well-formed uplink is rejected with its reason (like any invalid
        update) and never reaches the strategy; the strategy applies the
        same gate as in the simulator (sampled clients only, one reply each,
        the sample count, the update-norm bound; :mod:`fs_gmfl.core.uplinks`),
        with ``federate.max_sample_count`` as the count's bound since this
        server does not know the shards.
        """
        server = self.server
        open_round = server.aggregation_of(server.state + 1)
        for (fs_id, _), content in zip(agg_info["staleness"], agg_info["client_feedback"]):
            if not (isinstance(content, tuple) and len(content) == 2 and content[1] is FOLDED):
                server.fold_on_arrival(int(fs_id) - 1, content)
        server.open_round = None
        report = open_round.aggregation.finish()
        report.rejected.update(open_round.malformed)
        server.record_round(open_round.rnd, report)
        server.hold_global()
        return {self.names.get(k, k): v for k, v in server.method.strategy.global_adapter().items()}


class FsGmflClient(ResilientClient, Client):
    """FederatedScope client running an fs_gmfl :class:`~fs_gmfl.core.protocol.ClientAlgorithm`.

    Per-client state of stateful methods lives in a disk-backed store (one
    client in memory at a time), as in the simulator.
    """

    def __init__(self, ID: int = -1, server_id: Any = None, state: int = -1, config: Any = None, data: Any = None,
                 model: Any = None, device: str = "cpu", strategy: Any = None, is_unseen_client: bool = False,
                 *args: Any, **kwargs: Any) -> None:
        super().__init__(ID, server_id, state, config, data, model, device, strategy, is_unseen_client, *args,
                         **kwargs)
        self._method: Method | None = None
        state_dir = tempfile.mkdtemp(prefix="fs_gmfl_client_state_")
        weakref.finalize(self, shutil.rmtree, state_dir, True)
        self.store = ClientStateStore(state_dir)
        run_cfg = to_run_config(config)
        self.seed = run_cfg.seed
        self.init_resilience(run_cfg.fault_tolerance)
        CLIENTS.append(self)

    @property
    def method(self) -> Method:
        """The method (built on first use from this client's model)."""
        if self._method is None:
            self._method = build_fs_method(self._cfg, self.trainer.ctx.model)
        return self._method

    @property
    def algorithm(self) -> ClientAlgorithm:
        """The method's client side."""
        return self.method.client

    def callback_funcs_for_model_para(self, message: FsMessage) -> None:
        """Train on the downlink and send the uplink."""
        self.state = message.state
        downlink = wire.decode(message.content, expect=wire.DOWNLINK)
        if self._cfg.federate.mode == "distributed":
            self._monitor.track_download_bytes(downlink.nbytes)
        cid = self.ID - 1
        with self.store.open(cid) as client_state:
            self.trainer.assign(Assignment(self.algorithm, downlink, cid, self.state + 1, client_state, self.seed))
            sample_size, _, results = self.trainer.train()
            uplink = self.trainer.take_uplink()
        logger.info(self._monitor.format_eval_res(results, rnd=self.state, role=f"Client #{self.ID}",
                                                  return_raw=True))
        reply = FsGmflMessage(msg_type="model_para", sender=self.ID, receiver=[message.sender], state=self.state,
                              timestamp=self._gen_timestamp(init_timestamp=message.timestamp,
                                                            instance_number=sample_size),
                              content=(uplink.num_samples, wire.encode(uplink, wire.UPLINK)), nbytes=uplink.nbytes)
        self.comm_manager.send(reply)
        self._monitor.track_upload_bytes(reply.nbytes)

    def callback_funcs_for_evaluate(self, message: FsMessage) -> None:
        """Count the adapter's bytes (distributed mode), then evaluate as FederatedScope does.

        For methods that train backbone weights the global tensors are loaded
        for the evaluation only: the client's model keeps the weights its
        method synced it to (FedKRSO's catch-up builds on them).
        """
        is_adapter = wire.kind_of(message.content) == wire.ADAPTER
        if self._cfg.federate.mode == "distributed" and is_adapter:
            self._monitor.track_download_bytes(wire.payload_bytes(message.content))
        if not (is_adapter and self.method.trains_backbone):
            super().callback_funcs_for_evaluate(message)
            return
        keys = [k[len(wire.TENSOR_PREFIX):] for k in message.content if k.startswith(wire.TENSOR_PREFIX)]
        with values_kept(self.trainer.ctx.model, keys):
            super().callback_funcs_for_evaluate(message)

