"""Fingerprints of tiny GMFL runs recorded before GMFL became a wrapper (issue 15 item 3).

``python tests/gmfl_golden.py`` (from the repository root, with the package on the path) rewrites
``tests/gmfl_pre_wrapper.json``; it was run once on the commit before the wrapper existed, and
``tests/test_gmfl_wrapper.py`` asserts that today's code reproduces every value bit for bit: the SHA-256 of the
final global adapter, every round's test loss and accuracy (exact float reprs), bytes and frozen fractions.
The adapter's digest is recorded per CPU capability (torch's kernels differ in the last bits between AVX2 and
AVX512; every metric and byte is the same): run the script on the pre-wrapper commit (f2c20e2) to add a CPU.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("gmfl_pre_wrapper.json")
GROWING = ["gmfl.use", "True", "gmfl.period", "1", "gmfl.c", "0.25", "gmfl.beta", "0.25",
           "federate.total_round_num", "4", "eval.freq", "1"]
#: name -> overrides of the tiny configuration (tests/conftest.py TINY); period 1 so the mask changes every round.
CASES = {
    "fedit_gmfl": ["federate.method", "fedit", *GROWING],
    "ffa_lora_gmfl": ["federate.method", "ffa_lora", *GROWING],
    "fedit_gmfl_stateful": ["federate.method", "fedit", *GROWING, "gmfl.downlink", "stateful_sync"],
    "fedit_gmfl_random": ["federate.method", "fedit", *GROWING, "gmfl.selection", "random"],
    "ffa_lora_gmfl_stateful_relative_sum": ["federate.method", "ffa_lora", *GROWING, "gmfl.downlink", "stateful_sync",
                                            "gmfl.normalize", "relative", "gmfl.stat", "period_sum_l1"],
}
ROUND_FIELDS = ("round", "clients", "uplink_bytes", "downlink_bytes", "uplink_control_bytes",
                "downlink_control_bytes", "frozen_fraction", "frozen_numel_fraction", "freeze_ratio", "test_acc",
                "test_loss")


def cpu_capability() -> str:
    """The CPU kernels torch dispatches to (``AVX512``, ``AVX2``, ...): float results, and so the adapter's bits,
    may differ between them, while every metric and byte count stays the same."""
    return str(torch.backends.cpu.get_cpu_capability())


def adapter_digest(adapter: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the keys (sorted) and the raw bytes of each tensor."""
    h = hashlib.sha256()
    for key in sorted(adapter):
        h.update(key.encode())
        h.update(adapter[key].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint(overrides: list[str], outdir: str) -> dict:
    """Run the tiny simulation with ``overrides`` and return what the golden file stores."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_config

    from fs_gmfl.hosts.sim.runner import Simulation

    sim = Simulation(tiny_config(outdir, *overrides, "expname", "golden"), quiet=True)
    summary = sim.run()
    rows = [{k: r[k] for k in ROUND_FIELDS if k in r} for r in summary["per_round"]]
    return {"adapter_sha256": adapter_digest(sim.method.strategy.global_adapter()), "per_round": rows,
            "comm": {k: summary["comm"][k] for k in sorted(summary["comm"]) if k.endswith("bytes")}}


if __name__ == "__main__":
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        record = {name: fingerprint(overrides, f"{tmp}/{name}") for name, overrides in CASES.items()}
    for name, row in record.items():  # keep the adapter digests other CPUs gave; add this CPU's
        digests = recorded.get(name, {}).get("adapter_sha256", {})
        row["adapter_sha256"] = {**(digests if isinstance(digests, dict) else {}), cpu_capability(): row[
            "adapter_sha256"]}
    GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
