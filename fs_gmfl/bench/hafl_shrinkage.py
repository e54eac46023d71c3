"""``fs-gmfl bench hafl --shrinkage``: zero-padding's shrinkage of the components few clients train, measured.

Zero-padding aggregation (HAFL spec 8.2, IFZLoRA) averages every rank-1
component ``b_i a_i`` over all the round's contributors, a client that did not
train ``i`` counting as zeros; adaptive aggregation (spec 8.1, eq. 14,
IFALoRA) averages it over the clients that trained it. If a share ``s_i`` of
the contributors trained ``i`` (equal client weights), zero-padding's ``a_i``
and ``b_i`` are ``s_i`` times their adaptive averages, so the component's
norm ``||b_i|| ||a_i||`` is ``s_i**2`` times what adaptive aggregation gives
(a component nobody trained becomes 0).

The probe runs the benchmark's IFALoRA and IFZLoRA configurations with the
same seed (so the same clients, profiles and data) and records after every
round, per LoRA module and component: the share of that round's contributors
that uploaded it and its norm in the global model before and after the
aggregation. Reported per round: the mean adapter update norm ``||B A||_F``
over modules, and for the components only part of the contributors trained,
the median ratio of their norm after the round to before it, beside the
median ``s_i**2``. Writes ``shrinkage.json`` and ``shrinkage.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fs_gmfl.bench.common import machine, markdown_table, progress, write_json
from fs_gmfl.config import RunConfig
from fs_gmfl.core.hafl.ops import rank1_norms
from fs_gmfl.core.hafl.wire import INDICES
from fs_gmfl.hosts.sim.runner import Simulation

#: the two aggregations compared (same training, same clients).
PROBED = ("IFALoRA", "IFZLoRA")


def component_norms(state: dict[str, torch.Tensor], pairs: Sequence[Any]) -> torch.Tensor:
    """``||b_i|| ||a_i||`` of every component: a (modules x rank) float64 tensor."""
    return torch.stack([rank1_norms(state[p.a_key], state[p.b_key]) for p in pairs])


def update_norms(state: dict[str, torch.Tensor], pairs: Sequence[Any]) -> torch.Tensor:
    """``||B A||_F`` of every module (the adapter's weight update; the LoRA scaling left out)."""
    return torch.stack([(state[p.b_key].double() @ state[p.a_key].double()).norm() for p in pairs])


def _median(values: torch.Tensor) -> float:
    """The median of ``values`` (NaN when empty)."""
    return statistics.median(values.tolist()) if values.numel() else float("nan")


class ShrinkageRecorder:
    """Wraps a HAFL strategy's fold so that every round's trainer shares and component norms are recorded."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.rounds: list[dict[str, Any]] = []
        self._counts: torch.Tensor | None = None
        self._contributors = 0
        self._before: torch.Tensor | None = None
        fold_begin, fold_reply, fold_end = strategy.begin_fold, strategy.fold_reply, strategy.end_fold

        def begin(rnd: int) -> None:
            pairs = strategy.pairs
            self._counts = torch.zeros(len(pairs), strategy.rank, dtype=torch.float64)
            self._contributors = 0
            self._before = component_norms(strategy.global_state, pairs)
            fold_begin(rnd)

        def reply(r: Any, parsed: Any) -> None:
            fold_reply(r, parsed)
            indices = r.message.control[INDICES].to(torch.long)
            if indices.shape[1]:
                self._contributors += 1
                for row, picked in zip(strategy.active_rows, indices):
                    self._counts[row, picked] += 1

        def end(rnd: int, report: Any) -> None:
            fold_end(rnd, report)
            self.rounds.append(self._round_record(rnd))

        strategy.begin_fold, strategy.fold_reply, strategy.end_fold = begin, reply, end

    def _round_record(self, rnd: int) -> dict[str, Any]:
        pairs = self.strategy.pairs
        after = component_norms(self.strategy.global_state, pairs)
        share = self._counts / max(self._contributors, 1)
        some = (share > 0) & (share < 1)
        partial = some & (self._before > 0)  # a component at norm 0 before the round has no ratio
        return {"round": rnd, "contributors": self._contributors,
                "components": int(share.numel()), "trained_by_all": int((share == 1).sum()),
                "trained_by_some": int(some.sum()), "trained_by_none": int((share == 0).sum()),
                "median_share_some": _median(share[some]),
                "median_ratio_some": _median(after[partial] / self._before[partial]),
                "median_share_squared_some": _median(share[partial] ** 2),
                "mean_update_norm": float(update_norms(self.strategy.global_state, pairs).mean()),
                "mean_component_norm": float(after.mean())}


def probe(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg`` with a recorder on its HAFL strategy; its per-round records and the run's final metrics."""
    sim = Simulation(cfg, quiet=True, overwrite=True)
    recorder: list[ShrinkageRecorder] = []
    setup = sim.setup

    def setup_and_record() -> None:
        setup()
        recorder.append(ShrinkageRecorder(sim.method.strategy))

    sim.setup = setup_and_record  # type: ignore[method-assign]
    summary = sim.run()
    return {"rounds": recorder[0].rounds, "final": summary["final"],
            "aggregation": cfg.hafl.aggregation, "wall_seconds": summary["wall_seconds"]}


def rows(results: dict[str, list[dict[str, Any]]], seed_index: int) -> list[list[Any]]:
    """One table row per round: both methods' mean update norm, IFZLoRA's shrink of partly trained components."""
    ifa, ifz = (results[m][seed_index]["rounds"] for m in PROBED)
    out = []
    for a, z in zip(ifa, ifz):
        out.append([a["round"], f"{a['mean_update_norm']:.4f}", f"{z['mean_update_norm']:.4f}",
                    f"{z['mean_update_norm'] / a['mean_update_norm']:.3f}" if a["mean_update_norm"] else "-",
                    f"{z['trained_by_all']} / {z['trained_by_some']} / {z['trained_by_none']}",
                    f"{z['median_share_some']:.2f}", f"{z['median_ratio_some']:.3f}",
                    f"{z['median_share_squared_some']:.3f}", f"{a['median_ratio_some']:.3f}"])
    return out


HEADER = ["round", "IFALoRA mean ||BA||", "IFZLoRA mean ||BA||", "IFZ / IFA",
          "IFZLoRA components trained by all / some / none", "median share s (some)",
          "IFZLoRA median norm after / before (some)", "median s^2 (some)", "IFALoRA median norm after / before (some)"]


def shrinkage_main(args: argparse.Namespace, config: Any, extra: Sequence[str]) -> int:
    """Run both probes per seed, then write ``shrinkage.json`` and ``shrinkage.md``; returns an exit code.

    ``config(method, overrides)`` builds a method's benchmark configuration.
    """
    out = Path(args.out)
    common = ["federate.total_round_num", str(args.rounds), "eval.freq", str(args.rounds),
              "outdir", str(out / "shrinkage_runs"), *extra]
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in PROBED}
    for seed in args.seeds:
        for method in PROBED:
            progress(f"[bench hafl --shrinkage] seed {seed}: {method}")
            cfg = config(method, [*common, "seed", str(seed), "expname", f"{method.lower()}_s{seed}"])
            results[method].append(probe(cfg))
    text = ""
    for i, seed in enumerate(args.seeds):
        finals = ", ".join(f"{m} {results[m][i]['final'].get('test_acc', float('nan')) * 100:.1f} %" for m in PROBED)
        text += f"Seed {seed} (test accuracy at round {args.rounds}: {finals}):\n\n"
        text += markdown_table(HEADER, rows(results, i)) + "\n\n"
    write_json(out / "shrinkage.json", {"args": vars(args), "machine": machine(), "runs": results})
    (out / "shrinkage.md").write_text(text, encoding="utf-8")
    print(text)
    progress(f"[bench hafl --shrinkage] wrote {out / 'shrinkage.json'}, {out / 'shrinkage.md'}")
    return 0
