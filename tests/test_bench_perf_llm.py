"""``fs-gmfl bench perf --blocks llm`` on a tiny random Llama: the replay matches the simulator's steps, and each
method's trained parameters and optimizer state match a hand count."""

from __future__ import annotations

import json

import pytest

from fs_gmfl.bench.llm import quick_overrides
from fs_gmfl.bench import perf_llm
from fs_gmfl.bench.perf import main

pytestmark = pytest.mark.usefixtures("single_thread")

# tiny_llama of bench llm --quick: hidden 32, 2 layers; LoRA r 8 on q_proj and v_proj (32 -> 32)
LAYERS, MODULES, HIDDEN, R = 2, 2, 32, 8
LORA = LAYERS * MODULES * (R * HIDDEN + HIDDEN * R)  # 2,048
DENSE = LAYERS * MODULES * HIDDEN * HIDDEN  # 4,096: q_proj and v_proj weights in full


#: the methods measured here (each costs a fresh process); the block's full list is checked by name below.
MEASURED = ("FedIT", "ITALoRA r=2 (weakest profile)", "IFALoRA n=2 of 8 (weakest)", "FFT (same modules)")


@pytest.fixture(scope="module")
def llm_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf_llm")
    every = perf_llm.memory_methods()
    patch = pytest.MonkeyPatch()
    patch.setattr(perf_llm, "memory_methods", lambda: {k: every[k] for k in MEASURED})
    words = quick_overrides(out)
    pairs = [(k, v) for k, v in zip(words[::2], words[1::2]) if k not in ("eval.freq", "federate.total_round_num")]
    sets = [w for k, v in pairs for w in ("--llm-set", k, v)]  # the block sets the rounds and evaluation itself
    assert main(["--blocks", "llm", "--llm-rounds", "1", "--repeats", "1", "--llm-steps", "1", "--llm-warmup", "1",
                 "--out", str(out), *sets]) == 0
    patch.undo()
    return out, json.loads((out / "results.json").read_text())["llm"]


def test_plain_loop_replays_the_simulators_batches(llm_results):
    _, block = llm_results
    t = block["throughput"]
    assert t["steps"] == 1 * 3 * 3  # 1 round x 3 clients x 3 local steps, as the simulator counted them
    assert t["runs"]["simulator"][0]["steps"] == t["steps"]
    assert 0 < t["tokens"] <= t["padded_tokens"]
    for name, seconds in t["median_s"].items():
        assert t["tokens_per_s"][name] == pytest.approx(t["tokens"] / seconds)


def test_memory_rows_count_the_trained_tensors_by_hand(llm_results):
    out, block = llm_results
    mem = block["memory"]
    assert mem["FedIT"]["trainable_params"] == LORA and mem["FedIT"]["trained_params"] == LORA
    assert mem["ITALoRA r=2 (weakest profile)"]["trainable_params"] == LORA // 4
    assert list(mem) == list(MEASURED)
    assert mem["IFALoRA n=2 of 8 (weakest)"]["trainable_params"] == LORA
    assert mem["IFALoRA n=2 of 8 (weakest)"]["trained_params"] == LORA // 4
    assert mem["FFT (same modules)"]["trained_params"] == DENSE
    for label, m in mem.items():
        # AdamW: two fp32 moments per trainable value plus one step counter per tensor
        assert 2 * m["param_bytes"] <= m["optimizer_state_bytes"] <= 2 * m["param_bytes"] + 1024, label
        assert m["peak_rss_bytes"] > 0 and m["median_step_seconds"] > 0
    table = (out / "table.md").read_text()
    assert "tokens/s" in table and "IFALoRA n=2 of 8" in table


def test_the_block_measures_every_method_of_bench_llm_and_the_full_training_baselines():
    assert list(perf_llm.memory_methods()) == [
        "FedIT", "FedIT+GMFL", "FFA-LoRA", "FedEx-LoRA", "LoRA-A2", "ITALoRA r=2 (weakest profile)",
        "ITALoRA r=8 (strongest)", "IFALoRA n=2 of 8 (weakest)", "IFALoRA n=8 of 8 (strongest)",
        "FedKRSO (K 10, r 8, same modules)", "FFT (same modules)"]
