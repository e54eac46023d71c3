"""``fs-gmfl bench llm --quick``: every method runs on a tiny causal LM; bytes match a hand count."""

from __future__ import annotations

import json

import pytest

from fs_gmfl.bench.llm import main

# tiny_llama in --quick: hidden 32, 2 layers, LoRA r 8 on q_proj and v_proj (both 32 -> 32), so one client's
# full adapter is 2 layers x 2 modules x (A 8x32 + B 32x8) = 2,048 fp32 values = 8,192 bytes, 256 values per
# rank-1 component (of 8). --quick runs 2 rounds with all 3 clients, one per HAFL profile (r 2, 4, 8).
FULL_UPLOAD = 8192
ROUNDS, CLIENTS = 2, 3


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_llm")
    assert main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_quick_runs_every_method_and_writes_outputs(quick_results):
    out, results = quick_results
    assert list(results["runs"]) == ["FedIT", "FedIT+GMFL", "FFA-LoRA", "FFA-LoRA+GMFL", "ITALoRA", "IFALoRA",
                                     "FedEx-LoRA", "FedEx-LoRA+GMFL", "LoRA-A2", "LoRA-A2+GMFL", "FLoRA (hetero r)"]
    for name in ("table.md", "llm_bench.png", "llm_bench_loss.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "EM base %" in table and "bf16 autocast" in table


def test_round_zero_is_the_same_base_model_for_every_method(quick_results):
    _, results = quick_results
    base = {m: next(r for r in ss[0]["per_round"] if r["round"] == 0) for m, ss in results["runs"].items()}
    losses = {round(row["test_token_loss"], 6) for row in base.values()}
    matches = {row["test_exact_match"] for row in base.values()}
    assert len(losses) == 1 and len(matches) == 1


def test_uplink_payload_matches_the_hand_count(quick_results):
    _, results = quick_results
    payload = {m: ss[0]["comm"]["uplink_payload_bytes"] for m, ss in results["runs"].items()}
    assert payload["FedIT"] == ROUNDS * CLIENTS * FULL_UPLOAD
    assert payload["FedIT+GMFL"] == payload["FedIT"]  # a GMFL refresh at round 2 acts from round 3
    assert payload["FFA-LoRA"] == ROUNDS * CLIENTS * FULL_UPLOAD // 2  # B only
    assert payload["FFA-LoRA+GMFL"] == payload["FFA-LoRA"]
    per_component = FULL_UPLOAD // 8
    assert payload["ITALoRA"] == ROUNDS * (2 + 4 + 8) * per_component  # truncation to r 2, 4, 8
    assert payload["IFALoRA"] == ROUNDS * (2 + 4 + 8) * per_component  # freezing 75 %, 50 %, 0 % of 8
    assert payload["FedEx-LoRA"] == payload["FedIT"]  # its residual travels down only
    assert payload["FedEx-LoRA+GMFL"] == payload["FedIT"]
    assert payload["LoRA-A2"] == ROUNDS * CLIENTS * FULL_UPLOAD // 2  # B in round 1, A in round 2
    assert payload["FLoRA (hetero r)"] == ROUNDS * (2 + 4 + 8) * per_component  # fresh modules of rank 2, 4, 8


def test_method_subset_and_run_names():
    from fs_gmfl.bench.llm import parse_args, run_name

    args = parse_args(["--methods", "FLoRA (hetero r), LoRA-A2+GMFL,FedIT"])
    assert args.methods == ["FLoRA (hetero r)", "LoRA-A2+GMFL", "FedIT"]
    assert [run_name(m, 1) for m in args.methods] == ["flora_hetero_r_s1", "loraa2_gmfl_s1", "fedit_s1"]
    with pytest.raises(SystemExit):
        parse_args(["--methods", "FLoRA"])


def test_each_run_reports_its_own_process_memory_and_eval_cost(quick_results):
    _, results = quick_results
    for runs in results["runs"].values():
        run = runs[0]
        assert run["peak_rss_bytes"] > 50 * 2**20
        evaluated = [r for r in run["per_round"] if r["round"] > 0 and "eval_seconds" in r]
        assert evaluated and all(r["eval_seconds"] > 0 and r["train_seconds"] > 0 for r in evaluated)
    timing = results["timing"]
    assert timing["fp32"]["ratio_to_fp32"] == 1.0
    assert all(t["steps_timed"] >= 1 and t["peak_step_bytes"] > 0 for t in timing.values())
