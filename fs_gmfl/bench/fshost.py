"""``fs-gmfl bench fshost``: one YAML file on both hosts, side by side.

Runs a two-host configuration (default: FedIT + GMFL on the pre-trained MiniLM
and real Rotten Tomatoes reviews, ``yaml_configs/fs/gmfl_fedit_minilm_both_hosts.yaml``)
in the embedded simulator (in this process) and through FederatedScope's
unmodified main (``fs-gmfl fs-run`` in a subprocess), one torch thread each
(FederatedScope's standalone runner forces one), one host after the other, for
``--repeats`` alternating repetitions. Reports per host: wall time (median),
FederatedScope's own FL time, final test accuracy, total bytes each way; and
across hosts: whether every round's bytes agree and the largest difference
between the two final global adapters. Writes ``results.json``, ``table.md``
and ``fshost_bench.png`` to ``--out``. Needs FederatedScope importable.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fs_gmfl.bench.common import machine, markdown_table, progress, write_json
from fs_gmfl.bench.options import BenchParser, output_dir, positive
from fs_gmfl.config import load_config
from fs_gmfl.core.adapter import adapter_key
from fs_gmfl.errors import InputError
from fs_gmfl.hosts.sim.runner import Simulation
from fs_gmfl.plots import MIB, plot_runs

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CFG = ROOT / "yaml_configs" / "fs" / "gmfl_fedit_minilm_both_hosts.yaml"
BYTE_KEYS = ("uplink_bytes", "downlink_bytes", "uplink_control_bytes", "downlink_control_bytes")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Benchmark options."""
    p = BenchParser("fshost", __doc__)
    p.add_argument("--cfg", default=str(DEFAULT_CFG), help="a configuration that loads in both hosts")
    p.add_argument("--rounds", type=positive, default=10)
    p.add_argument("--repeats", type=positive, default=1, help="alternating repetitions of the pair of runs")
    p.add_argument("--out", type=output_dir, default="bench_out/fshost")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="extra configuration override (repeatable)")
    return p.parse_args(list(argv))


def overrides(args: argparse.Namespace, run_dir: Path, name: str) -> list[str]:
    """Overrides shared by both hosts, plus the output location of run ``name``."""
    opts = ["federate.total_round_num", str(args.rounds), "eval.freq", str(args.rounds)]
    opts += [x for pair in args.set for x in pair]
    return opts + ["outdir", str(run_dir), "expname", name]


def run_simulator(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """The simulator run (one torch thread, as FederatedScope's standalone runner)."""
    torch.set_num_threads(1)
    cfg = load_config(args.cfg, overrides(args, run_dir, "sim"))
    start = time.perf_counter()
    sim = Simulation(cfg, quiet=True, overwrite=True)  # a benchmark re-run replaces its runs
    summary = sim.run()
    return {"wall_s": time.perf_counter() - start, "fl_s": summary["wall_seconds"], "summary": summary,
            "adapter": sim.method.strategy.global_adapter(), "test_acc": summary["final"].get("test_acc")}


def run_federatedscope(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """The FederatedScope run through the launcher, in a subprocess."""
    ckpt = run_dir / "fs.ckpt"
    python = getattr(args, "python", None) or sys.executable  # FederatedScope's environment may be another one
    cmd = [python, "-m", "fs_gmfl", "fs-run", "--cfg", args.cfg, *overrides(args, run_dir, "fs"),
           "federate.save_to", str(ckpt)]
    # FederatedScope writes a repeated run into <outdir>/sub_exp_<time>/ when <outdir> exists, and the files read
    # below would then be the first run's: every run starts from an empty output directory.
    shutil.rmtree(run_dir / "fs", ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise InputError(f"FederatedScope run failed (exit {result.returncode}): {result.stderr[-2000:]}")
    out = run_dir / "fs"
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    state = torch.load(run_dir / "final_fs.ckpt", map_location="cpu", weights_only=True)["model"]
    return {"wall_s": wall, "fl_s": server_fl_seconds(out), "summary": summary, "test_acc": last_test_acc(out),
            "adapter": {adapter_key(k): v for k, v in state.items()}, "curve": server_curve(out)}


def server_results(run_dir: Path) -> list[dict[str, Any]]:
    """The server's evaluation records in FederatedScope's ``eval_results.log`` (numpy reprs tolerated)."""
    rows = []
    for line in (run_dir / "eval_results.log").read_text(encoding="utf-8").splitlines():
        text = re.sub(r"np\.float\d+\(([^)]*)\)", r"\1", line.strip())
        try:
            row = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(row, dict) and row.get("Role") == "Server #" and isinstance(row.get("Round"), int):
            rows.append(row)
    return rows


def last_test_acc(run_dir: Path) -> float | None:
    """Test accuracy of the server's last evaluation."""
    rows = [r["Results_raw"] for r in server_results(run_dir) if "test_acc" in r.get("Results_raw", {})]
    return float(rows[-1]["test_acc"]) if rows else None


def server_curve(run_dir: Path) -> list[dict[str, Any]]:
    """Per-round rows with ``test_acc`` (FederatedScope labels an evaluation after round r as round r)."""
    return [{"round": r["Round"], "test_acc": float(r["Results_raw"]["test_acc"])}
            for r in server_results(run_dir) if "test_acc" in r.get("Results_raw", {})]


def server_fl_seconds(run_dir: Path) -> float | None:
    """FederatedScope's own FL time of the server (``fl_end_time_minutes`` in ``system_metrics.log``)."""
    for line in (run_dir / "system_metrics.log").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("id") == 0:
            return 60.0 * float(row["fl_end_time_minutes"])
    return None


def compare(sim: dict[str, Any], fs: dict[str, Any]) -> dict[str, Any]:
    """Bytes round by round and the largest absolute difference of the final global adapters."""
    sim_rows, fs_rows = sim["summary"]["per_round"][1:], fs["summary"]["per_round"]
    same_bytes = [{k: r[k] for k in BYTE_KEYS} for r in sim_rows] == [{k: r[k] for k in BYTE_KEYS} for r in fs_rows]
    keys = sorted(sim["adapter"])
    same_keys = keys == sorted(fs["adapter"])
    diff = max(float((sim["adapter"][k] - fs["adapter"][k]).abs().max()) for k in keys) if same_keys else None
    return {"same_bytes_every_round": same_bytes, "same_adapter_keys": same_keys, "max_abs_adapter_diff": diff}


def main(argv: Sequence[str]) -> int:
    """Run the benchmark and write its outputs."""
    args = parse_args(argv)
    from fs_gmfl.hosts.fs import fs_available

    if not fs_available():
        raise InputError("fs-gmfl bench fshost needs FederatedScope installed (see docs/federatedscope.md)")
    out = Path(args.out)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        rep_dir = out / f"rep{rep}"
        order = ("sim", "fs") if rep % 2 == 0 else ("fs", "sim")
        result: dict[str, Any] = {}
        for host in order:
            progress(f"repeat {rep + 1}/{args.repeats}: {host}")
            result[host] = (run_simulator if host == "sim" else run_federatedscope)(args, rep_dir)
        result["compare"] = compare(result["sim"], result["fs"])
        runs.append(result)
    write_outputs(args, out, runs)
    return 0


def host_row(name: str, runs: list[dict[str, Any]], host: str) -> list[Any]:
    walls = [r[host]["wall_s"] for r in runs]
    fl = [r[host]["fl_s"] for r in runs if r[host]["fl_s"] is not None]
    comm = runs[0][host]["summary"]["comm"]
    acc = runs[0][host]["test_acc"]
    return [name, f"{statistics.median(walls):.1f}", f"{statistics.median(fl):.1f}" if fl else "-",
            f"{acc:.4f}" if acc is not None else "-", f"{comm['uplink_bytes'] / MIB:.3f}",
            f"{comm['downlink_bytes'] / MIB:.3f}"]


def write_outputs(args: argparse.Namespace, out: Path, runs: list[dict[str, Any]]) -> None:
    """results.json, table.md and a plot of test accuracy against round for both hosts."""
    cmp = [r["compare"] for r in runs]
    results = {"machine": machine(), "args": vars(args), "compare": cmp,
               "hosts": [{h: {k: v for k, v in r[h].items() if k not in ("adapter", "summary")} for h in ("sim", "fs")}
                         for r in runs]}
    write_json(out / "results.json", results)
    header = ["host", "wall s (median)", "FL s (median)", "final test acc", "uplink MiB", "downlink MiB"]
    table = markdown_table(header, [host_row("embedded simulator", runs, "sim"),
                                    host_row("FederatedScope (fs-run)", runs, "fs")])
    diffs = [c["max_abs_adapter_diff"] for c in cmp]
    table += (f"\n\nSame bytes every round in every repeat: {all(c['same_bytes_every_round'] for c in cmp)}; "
              f"largest |global adapter difference| over repeats: {max(d for d in diffs if d is not None):.3g}.\n")
    (out / "table.md").write_text(table, encoding="utf-8")
    curve = {c["round"]: c["test_acc"] for c in runs[0]["fs"]["curve"]}
    fs_rows = [{**row, **({"test_acc": curve[row["round"]]} if row["round"] in curve else {})}
               for row in runs[0]["fs"]["summary"]["per_round"]]
    plot_runs([("simulator", runs[0]["sim"]["summary"]), ("FederatedScope", {"per_round": fs_rows})],
              out / "fshost_bench.png", metric="test_acc", title="same YAML, both hosts")
    print(table)
