"""The embedded in-process simulator: one server and N clients in one process.

Per round: sample clients, let the strategy write downlinks, deliver them
through the :class:`InMemoryTransport` (messages are copied, as on a wire),
train each client in turn on the one shared model, aggregate, evaluate every
``eval.freq`` rounds, and record bytes from the messages themselves. Only
one model exists, so memory does not grow with the number of clients.

A round in which every reply that arrived was rejected is logged and listed
in ``summary.json`` (``rejected_updates.all_rejected_rounds``); after
``federate.max_rejected_rounds`` such rounds in a row the run writes its
outputs and stops with :class:`~fs_gmfl.errors.RunStopped` (exit status 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import resource
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.adapter import adapter_state, load_model_tensors, model_tensor_map
from fs_gmfl.core.comm import CommLedger
from fs_gmfl.core.message import Message, Reply
from fs_gmfl.core.protocol import TrainStats
from fs_gmfl.core.uplinks import set_shard_sizes
from fs_gmfl.errors import ConfigError, InputError, RunStopped
from fs_gmfl.hosts.common.batches import sample_clients
from fs_gmfl.hosts.common.data import FederatedData, federated_data_for
from fs_gmfl.hosts.common.llm_eval import EvalSettings, evaluate_causal_lm
from fs_gmfl.hosts.common.models import (AdapterVariants, build_backbone, choose_device, load_tokenizer,
                                         prepare_for_training)
from fs_gmfl.hosts.common.preflight import check_run as check_resources
from fs_gmfl.hosts.common.rundir import RunDirectory
from fs_gmfl.hosts.common.sanity import check_data
from fs_gmfl.hosts.common.store import ClientStateStore
from fs_gmfl.hosts.common.threads import set_torch_threads
from fs_gmfl.hosts.sim.checkpoint import Checkpoint, load_checkpoint, restore_rng, save_checkpoint
from fs_gmfl.hosts.sim.faults import DROPPED_AFTER, DROPPED_BEFORE, FATES, ON_TIME, nan_uplink, round_fates
from fs_gmfl.hosts.sim.outputs import RunWriter, complete_finished_run, completed_rounds
from fs_gmfl.hosts.sim.records import RUN_RECORDS, all_rejected_rounds, is_all_rejected, rejection_streak
from fs_gmfl.hosts.sim.training import autocast_context, evaluate, train_local
from fs_gmfl.methods import Method, MethodContext, build_method
from fs_gmfl.plots import MIB

logger = logging.getLogger(__name__)


class InMemoryTransport:
    """Delivers downlinks to in-process clients and returns their uplinks.

    Both directions are copied so that neither side can alias the other's
    tensors, as over a real network.
    """

    def __init__(self, client_fn: Callable[[int, int, Message], Message]) -> None:
        self.client_fn = client_fn

    def replies(self, rnd: int, downlinks: dict[int, Message]) -> Iterator[Reply]:
        """Run the addressed clients one at a time, in client-id order, yielding each reply as it is made.

        Each downlink is removed from ``downlinks`` once delivered, and the
        reply just yielded is released before the next client runs, so at
        most one uplink is alive at a time.
        """
        for cid in sorted(downlinks):
            yield self.deliver(rnd, cid, downlinks.pop(cid))

    def deliver(self, rnd: int, client_id: int, downlink: Message) -> Reply:
        """Run one client on (a copy of) its downlink; its reply (a copy)."""
        return Reply(client_id, self.client_fn(rnd, client_id, downlink.detached_copy()).detached_copy())


@contextlib.contextmanager
def temporarily_loaded(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Load ``tensors`` into ``model`` and restore the previous values afterwards."""
    params = model_tensor_map(model, tensors.keys())
    saved = {k: p.detach().clone() for k, p in params.items()}
    load_model_tensors(model, tensors)
    try:
        yield
    finally:
        load_model_tensors(model, saved)


def weighted_client_metrics(results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Sample-weighted mean of per-client validation metrics, as ``clients_val_<metric>``."""
    total = sum(n for n, _ in results)
    if not total:
        return {}
    keys = set.intersection(*(set(m) for _, m in results))
    return {f"clients_val_{k}": sum(n * m[k] for n, m in results) / total for k in sorted(keys)}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Simulation:
    """A federated run of ``cfg`` in this process.

    Args:
        cfg: the run configuration.
        quiet: no progress bar and no final line.
        resume: continue from the latest checkpoint in the run directory
            (written every ``federate.save_freq`` rounds).
        overwrite: replace a finished run in the same directory (refused otherwise).
    """

    def __init__(self, cfg: RunConfig, *, quiet: bool = False, resume: bool = False,
                 overwrite: bool = False) -> None:
        if cfg.federate.mode != "standalone":
            raise ConfigError("federate.mode", cfg.federate.mode, "'standalone' in the embedded simulator; "
                              "distributed runs go through the FederatedScope host ('fs-gmfl fs-run')")
        cfg.faults.check_clients(cfg.federate.client_num)
        self.cfg = cfg
        self.quiet = quiet
        self.resume = resume
        self.overwrite = overwrite
        self.checkpoint: Checkpoint | None = None
        self.saved_round: int | None = None  # the round of the latest checkpoint this run wrote or resumed
        self.eval_records: list[tuple[int, dict[str, float]]] = []
        self._last_evaluation: tuple[str, dict[str, float]] | None = None
        self.evaluations_reused = 0
        self.run_dir = Path(cfg.outdir) / cfg.run_name
        self.device = choose_device(cfg)
        if cfg.train.autocast == "float16" and self.device.type != "cuda":
            raise ConfigError("train.autocast", "float16", "'none' or 'bfloat16' on this machine (CUDA is not "
                              "available; float16 autocast with loss scaling is a GPU mode)")
        self.ledger = CommLedger()
        self.step_seconds: list[float] = []
        self.rejections: dict[str, int] = {}
        self.offline: set[int] = set()
        self.fault_counts: dict[str, int] = {fate: 0 for fate in FATES if fate != ON_TIME}
        self.empty_rounds: list[int] = []
        self.warnings: list[str] = []

    # -- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load data, build the model and the method."""
        cfg = self.cfg
        set_torch_threads()
        advice = check_resources(cfg)  # before anything is allocated: model directory, task, rank, length, memory
        tokenizer = load_tokenizer(cfg)
        self.data: FederatedData = federated_data_for(cfg, tokenizer)
        self.warnings = [*advice, *check_data(cfg, self.data)]  # errors for unusable data, warnings for summary.json
        num_labels = cfg.model.num_labels or self.data.num_labels
        self.backbone = build_backbone(cfg, num_labels)
        self.model = prepare_for_training(self.backbone.model, cfg, self.device)
        variants = AdapterVariants(self.model, cfg, self.backbone.target_modules)
        self.method: Method = build_method(MethodContext(cfg, adapter_state(self.model), variants,
                                                         model=self.model))
        set_shard_sizes(self.method.strategy, {c: len(i) for c, i in enumerate(self.data.client_indices)})
        self.transport = InMemoryTransport(self._fit_client)
        state_dir = self.run_dir / "client_state"
        if self.resume:  # verified and loaded into the method before anything on disk changes
            self.checkpoint = load_checkpoint(self.run_dir, cfg, self.method.strategy.name, RUN_RECORDS)
            self._restore_method(self.checkpoint)
        if state_dir.exists():
            shutil.rmtree(state_dir)  # a fresh run must not inherit client caches of an earlier run
        if self.checkpoint is not None:
            self._restore_records(self.checkpoint, state_dir)
        self.store = ClientStateStore(state_dir)

    # -- checkpoints -------------------------------------------------------------------------
    def _restore_method(self, ckpt: Checkpoint) -> None:
        """Put the server strategy and the host's model state back to the end of round ``ckpt.round``."""
        try:
            self.method.strategy.load_state_dict(ckpt.server_state["strategy"])
            self.method.client.load_host_state_dict(self.model, ckpt.server_state["client"])
        except (KeyError, ValueError, TypeError, IndexError) as err:
            raise InputError(f"checkpoint {ckpt.directory} does not fit this run's strategy: {err}") from None

    def _restore_records(self, ckpt: Checkpoint, state_dir: Path) -> None:
        """Put the client store, the run records (parsed by ``load_checkpoint``) and the RNG back."""
        if ckpt.client_state_dir.exists():
            shutil.copytree(ckpt.client_state_dir, state_dir)
        records = ckpt.records
        self.ledger = records["ledger"]
        self.step_seconds = records["step_seconds"]
        self.rejections = records["rejections"]
        self.fault_counts = records["fault_counts"]
        self.empty_rounds = records["empty_rounds"]
        self.eval_records = records["eval_records"]
        restore_rng(ckpt)
        self.saved_round = ckpt.round

    def save(self, rnd: int, per_round: list[dict[str, Any]]) -> None:
        """Checkpoint the run at the end of round ``rnd``."""
        records = {"per_round": per_round, "ledger": self.ledger.state_dict(), "step_seconds": self.step_seconds,
                   "rejections": self.rejections, "fault_counts": self.fault_counts,
                   "empty_rounds": self.empty_rounds, "eval_records": self.eval_records}
        save_checkpoint(self.run_dir, self.cfg, rnd=rnd, method=self.method.strategy.name,
                        server_state={"strategy": self.method.strategy.state_dict(),
                                        "client": self.method.client.host_state_dict(self.model)},
                        records=records,
                        client_state_dir=self.store.directory)
        self.saved_round = rnd

    def _due(self, rnd: int) -> bool:
        freq = self.cfg.federate.save_freq
        return freq > 0 and (rnd % freq == 0 or rnd == self.cfg.federate.total_round_num)

    def _fit_client(self, rnd: int, client_id: int, message: Message) -> Message:
        with self.store.open(client_id) as state:
            plan = self.method.client.prepare(self.model, message, state)
            data = self.data.client_data(client_id)
            if client_id in self.offline:  # dropped out after loading its downlink: no training, no reply
                stats = TrainStats(num_samples=len(data), steps=0, mean_loss=float("nan"))
            else:
                stats = train_local(plan, data, self.cfg, rnd=rnd, client_id=client_id, device=self.device)
            uplink = self.method.client.finish(plan, stats, state)
        self.step_seconds.extend(stats.step_seconds)
        return nan_uplink(uplink) if client_id in self.cfg.faults.nan_clients else uplink

    # -- one round ---------------------------------------------------------------------------
    def record_downlinks(self, rnd: int, downlinks: dict[int, Message]) -> None:
        """Count the round's downlinks (every one is delivered here; a host with remote clients counts those sent)."""
        for cid, msg in downlinks.items():
            self.ledger.record(rnd, cid, "downlink", msg)

    def run_round(self, rnd: int) -> dict[str, Any]:
        """Sample, exchange, aggregate; return the round's log row (without evaluation)."""
        cfg = self.cfg
        clients = sample_clients(cfg.federate.client_num, cfg.federate.clients_per_round(), seed=cfg.seed, rnd=rnd)
        strategy = self.method.strategy
        used = strategy.round_metrics()  # describes the state clients train under in this round
        downlinks = strategy.configure_round(rnd, clients)
        self.record_downlinks(rnd, downlinks)
        steps_before = len(self.step_seconds)
        fates = round_fates(cfg.faults, clients, seed=cfg.seed, rnd=rnd)
        self.offline = {c for c in clients if fates[c][0] == DROPPED_BEFORE}
        on_time: list[int] = []
        try:  # clients train one at a time while the strategy folds their replies in (a streaming fold)
            report = strategy.aggregate(rnd, self._arrivals(rnd, downlinks, fates, on_time))
        finally:
            self.offline = set()
        if not on_time:
            self.empty_rounds.append(rnd)
            logger.warning("round %d: no reply arrived in time; the global model is unchanged", rnd)
        for cid, reason in report.rejected.items():
            logger.warning("round %d: update of client %d rejected: %s", rnd, cid, reason)
            self.rejections[reason.split(":")[0]] = self.rejections.get(reason.split(":")[0], 0) + 1
        row: dict[str, Any] = {"round": rnd, "clients": clients, **self.ledger.round_totals(rnd),
                               "replies": len(on_time), "rejected": len(report.rejected), **used, **report.metrics}
        if is_all_rejected(row):
            logger.warning("round %d: every update that arrived (%d) was rejected; the global model is unchanged",
                           rnd, len(report.rejected))
        if cfg.faults.active:
            row.update(self._fault_row(fates))
        step_times = self.step_seconds[steps_before:]
        if step_times:
            row["median_step_seconds"] = statistics.median(step_times)
        return row

    def _arrivals(self, rnd: int, downlinks: dict[int, Message], fates: Mapping[int, tuple[str, float]],
                  on_time: list[int]) -> Iterator[Reply]:
        """The round's replies that reach the server in time, made one at a time as the strategy asks for them.

        Every client runs (a client dropped before training only loads its
        downlink); an uplink that crossed the network (on time or late) is
        counted; only on-time ones are yielded, and their ids appended to
        ``on_time``. No reply outlives its turn.
        """
        for reply in self.transport.replies(rnd, downlinks):
            fate = fates[reply.client_id][0]
            if fate not in (DROPPED_BEFORE, DROPPED_AFTER):
                self.ledger.record(rnd, reply.client_id, "uplink", reply.message)
            if fate == ON_TIME:
                on_time.append(reply.client_id)
                yield reply
            del reply  # release it before the next client trains

    def _fault_row(self, fates: Mapping[int, tuple[str, float]]) -> dict[str, Any]:
        """Per-round fault counts (also added to the run totals) and the round's simulated duration."""
        row: dict[str, Any] = {}
        for fate in self.fault_counts:
            row[fate] = sum(1 for f, _ in fates.values() if f == fate)
            self.fault_counts[fate] += row[fate]
        deadline = self.cfg.faults.deadline
        missing = any(f != ON_TIME for f, _ in fates.values())
        on_time = [seconds for f, seconds in fates.values() if f == ON_TIME]
        row["round_seconds"] = deadline if deadline > 0 and missing else max(on_time, default=0.0)
        return row

    def evaluate_global(self) -> dict[str, float]:
        """Evaluate the global adapter on the server-held splits, then the strategy's extra adapters.

        Extra adapters named ``client:<id>`` are evaluated on that client's
        local validation shard (``<name>/val_<metric>``) and summarised as
        ``clients_val_<metric>``, weighted by shard size; other names are
        evaluated like the global adapter (``<name>/test_<metric>``).
        Evaluation leaves the model exactly as it found it. When every
        adapter is bit-identical to the previous evaluation's (e.g. a round
        whose updates were all rejected), that evaluation's metrics are reused.
        """
        strategy = self.method.strategy
        global_adapter, extra = strategy.global_adapter(), strategy.evaluation_adapters()
        fingerprint = adapters_fingerprint({"": global_adapter, **extra})
        if self._last_evaluation is not None and self._last_evaluation[0] == fingerprint:
            self.evaluations_reused += 1
            logger.info("evaluation skipped: the adapters equal the previous evaluation's; its metrics reused")
            return dict(self._last_evaluation[1])
        with temporarily_loaded(self.model, global_adapter):
            results = self._evaluate_splits("")
        client_results: list[tuple[int, dict[str, float]]] = []
        for name, tensors in extra.items():
            with temporarily_loaded(self.model, tensors):
                if name.startswith("client:"):
                    cid = int(name.split(":", 1)[1])
                    data = self.data.client_val_data(cid)
                    if len(data):
                        metrics = self._metrics(data, "val")
                        client_results.append((len(data), metrics))
                        results.update({f"{name}/val_{k}": v for k, v in metrics.items()})
                else:
                    results.update(self._evaluate_splits(name + "/"))
        results.update(weighted_client_metrics(client_results))
        self._last_evaluation = (fingerprint, dict(results))
        return results

    def _metrics(self, data: Any, split: str) -> dict[str, float]:
        with autocast_context(self.cfg, self.device):
            return self._metrics_of(data, split)

    def _metrics_of(self, data: Any, split: str) -> dict[str, float]:
        cfg = self.cfg
        if cfg.model.task == "causal_lm":
            wanted = set(cfg.eval.metrics)
            settings = EvalSettings(batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                                    generation_rows=cfg.eval.generation_rows, seed=cfg.seed,
                                    exact_match=bool(wanted & {"acc", "exact_match"}), loss="loss" in wanted)
            return evaluate_causal_lm(self.model, self.backbone.tokenizer, data, settings, split=split,
                                      device=self.device)
        metrics = evaluate(self.model, data, batch_size=cfg.eval.batch_size, task=cfg.model.task, device=self.device)
        return {k: v for k, v in metrics.items() if k in cfg.eval.metrics or k == "ppl"}

    def _evaluate_splits(self, prefix: str) -> dict[str, float]:
        results: dict[str, float] = {}
        for split in self.cfg.eval.split:
            data = self.data.val if split == "val" else self.data.test
            if len(data):
                results.update({f"{prefix}{split}_{k}": v for k, v in self._metrics(data, split).items()})
        return results

    # -- the whole run -----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Lock the run directory, run every round, write the outputs and return the summary.

        SIGTERM is turned into ``KeyboardInterrupt`` for the whole run (set-up,
        rounds and outputs), so the command line ends it with status 130 and
        its message at any moment.
        """
        with stop_on_sigterm(), RunDirectory(self.run_dir, resume=self.resume, overwrite=self.overwrite) as rundir:
            if self.resume and rundir.finished:
                rounds = completed_rounds(self.run_dir)
                if rounds is not None and self.cfg.federate.total_round_num <= rounds:
                    return complete_finished_run(self.run_dir, self.cfg)  # nothing to train; missing outputs
            return self._run(rundir)

    def _run(self, rundir: RunDirectory) -> dict[str, Any]:
        start = time.time()
        self.setup()
        total = self.cfg.federate.total_round_num
        if self.checkpoint is not None and (self.checkpoint.round > total
                                            or (self.checkpoint.round == total and rundir.finished)):
            raise ConfigError("federate.total_round_num", total, f"more than the {self.checkpoint.round} rounds "
                              "already run by the checkpoint being resumed (that run is finished)")
        # a checkpoint of the last round without summary.json: the run was killed while writing its outputs;
        # resuming runs no round and writes them.
        rundir.clear_finished()
        writer = RunWriter(self.run_dir, self.cfg)
        if self.checkpoint is not None:
            per_round: list[dict[str, Any]] = list(self.checkpoint.records["per_round"])
            for rnd, metrics in self.eval_records:
                writer.eval_line(rnd, metrics)
            first = self.checkpoint.round + 1
        else:
            started = time.perf_counter()
            per_round = [{"round": 0, **self._evaluate_and_log(writer, 0), "eval_seconds": 0.0}]
            per_round[0]["eval_seconds"] = time.perf_counter() - started
            first = 1
        bar = tqdm(range(first, total + 1), desc=self.cfg.run_name, unit="round", disable=self.quiet,
                   file=sys.stderr, dynamic_ncols=True)
        for rnd in bar:
            started = time.perf_counter()
            row = self.run_round(rnd)
            row["train_seconds"] = time.perf_counter() - started
            if rnd % self.cfg.eval.freq == 0 or rnd == total:
                started = time.perf_counter()
                row.update(self._evaluate_and_log(writer, rnd))
                row["eval_seconds"] = time.perf_counter() - started
            per_round.append(row)
            if self._due(rnd):
                self.save(rnd, per_round)
            bar.set_postfix(self._progress(per_round), refresh=False)
            stop = self._rejection_stop(per_round)
            if stop:
                bar.close()
                writer.finish(self.summary(per_round, time.time() - start, stopped=stop), self.ledger)
                raise RunStopped(stop["reason"])
        summary = self.summary(per_round, time.time() - start)
        writer.finish(summary, self.ledger)
        if not self.quiet:
            final = summary["final"]
            print(f"{self.cfg.run_name}: {total} rounds, " + ", ".join(f"{k} {v:.4f}" for k, v in final.items())
                  + f", uplink {summary['comm']['uplink_bytes'] / MIB:.2f} MiB, downlink "
                  f"{summary['comm']['downlink_bytes'] / MIB:.2f} MiB -> {self.run_dir}", file=sys.stderr)
        return summary

    def _rejection_stop(self, per_round: list[dict[str, Any]]) -> dict[str, Any] | None:
        """``{"after_round", "reason"}`` once ``federate.max_rejected_rounds`` all-rejected rounds came in a row."""
        limit = self.cfg.federate.max_rejected_rounds
        streak = rejection_streak(per_round)
        if not limit or len(streak) < limit:
            return None
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.rejections.items()))
        return {"after_round": streak[-1], "reason": (
            f"run stopped after round {streak[-1]}: every client update that arrived was rejected in {len(streak)} "
            f"rounds in a row (rounds {', '.join(map(str, streak))}; rejections by reason: {reasons}), so the global "
            f"model has stopped moving; outputs in {self.run_dir} (summary.json: rejected_updates); "
            f"federate.max_rejected_rounds = {limit} (0: never stop)")}

    def _evaluate_and_log(self, writer: RunWriter, rnd: int) -> dict[str, float]:
        metrics = self.evaluate_global()
        self.eval_records.append((rnd, metrics))
        writer.eval_line(rnd, metrics)
        return metrics

    def _progress(self, per_round: list[dict[str, Any]]) -> dict[str, str]:
        totals = self.ledger.totals()
        post = {"up": f"{totals['uplink_bytes'] / MIB:.1f}MiB", "down": f"{totals['downlink_bytes'] / MIB:.1f}MiB"}
        latest = next((r for r in reversed(per_round) if any(k.endswith("_acc") or k.endswith("_loss") for k in r)),
                      None)
        for key in ("test_acc", "val_acc", "test_exact_match", "test_avg_loss", "test_loss"):
            if latest and key in latest:
                post[key] = f"{latest[key]:.3f}"
                break
        if "frozen_fraction" in per_round[-1]:
            post["frozen"] = f"{per_round[-1]['frozen_fraction']:.2f}"
        return post

    def summary(self, per_round: list[dict[str, Any]], wall: float,
                stopped: dict[str, Any] | None = None) -> dict[str, Any]:
        """The machine-readable summary of the run (``summary.json``); ``stopped``: why it ended early."""
        prefixes = ("test_", "val_", "clients_val_")
        evaluated = [r for r in per_round if any(k.startswith(prefixes) for k in r)]
        final = {k: v for k, v in evaluated[-1].items() if k.startswith(prefixes)} if evaluated else {}
        steps = self.step_seconds
        return {
            "method": self.method.strategy.name,
            "run_name": self.cfg.run_name,
            "rounds": stopped["after_round"] if stopped else self.cfg.federate.total_round_num,
            "stopped": stopped,
            "final": final,
            "comm": self.ledger.totals(),
            "per_round": per_round,
            "wall_seconds": wall,
            "peak_rss_bytes": peak_rss_bytes(),
            "timing": {"local_steps": len(steps),
                       "median_step_seconds": statistics.median(steps) if steps else None,
                       "mean_step_seconds": statistics.fmean(steps) if steps else None,
                       "evaluations_reused": self.evaluations_reused},
            "clients": {"num": self.cfg.federate.client_num, "per_round": self.cfg.federate.clients_per_round(),
                        "train_sizes": [int(len(i)) for i in self.data.client_indices]},
            "data": {"type": self.cfg.data.type, "train": len(self.data.train), "val": len(self.data.val),
                     "test": len(self.data.test), "num_labels": self.data.num_labels,
                     **({"truncated": self.data.truncation.as_dict()} if self.data.truncation else {})},
            "rejected_updates": {"total": sum(self.rejections.values()), "by_reason": dict(self.rejections),
                                 "all_rejected_rounds": all_rejected_rounds(per_round)},
            "faults": {**self.fault_counts, "rounds_without_replies": list(self.empty_rounds)},
            "method_info": self.method.info,
            "device": str(self.device),
            "precision": precision_of(self.cfg),
            "warnings": list(self.warnings),
        }


def adapters_fingerprint(adapters: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    """A digest of every tensor's name, dtype, shape and bytes: equal digests, the same model to evaluate."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(adapters):
        for key in sorted(adapters[name]):
            tensor = adapters[name][key].detach().cpu().contiguous()
            digest.update(f"{name}/{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into ``KeyboardInterrupt`` (like SIGINT) while the rounds run, in the main thread only.

    Checkpoints are written atomically, so stopping anywhere leaves the last one intact.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def precision_of(cfg: RunConfig) -> str:
    """How the run computes: ``fp32``, ``bfloat16 autocast`` or the is_enable_half dtype."""
    if cfg.train.is_enable_half:
        return f"{cfg.train.half_dtype} weights (is_enable_half)"
    if cfg.train.autocast == "float16":
        return "fp32 weights, float16 autocast, dynamic loss scaling"
    return "fp32" if cfg.train.autocast == "none" else f"fp32 weights, {cfg.train.autocast} autocast"

