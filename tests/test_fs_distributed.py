"""Distributed FederatedScope: one server and two clients on 127.0.0.1 over gRPC, each its own process.

Marked ``slow`` (about a minute per tiny-Llama run and 3-4 minutes per SmolLM2 run on two cores) and ``fs_host``
(skipped without FederatedScope; the SmolLM2 runs also skip, with the install command, without SmolLM2).
Ports are picked free at test time; every process is bounded by a deadline and killed in ``finally``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("federatedscope", reason="FederatedScope (branch llm) is not installed: FederatedScope host "
                    "tests skipped")

from fs_host_helpers import (FS_CONFIGS, ROLES, expname, free_ports, fs_command, fs_env, role_opts,  # noqa: E402
                             summary, system_metrics, wait_for_port)

from fs_gmfl.hosts.fs.assets import arithmetic_rows, write_tiny_llm_assets  # noqa: E402

pytestmark = [pytest.mark.fs_host, pytest.mark.slow]

DEADLINE_S = 420


def wait_all(procs: dict[str, subprocess.Popen], deadline_s: float) -> dict[str, int | str]:
    """Exit code of every process, or 'timeout' for one still running at the shared deadline."""
    end, codes = time.monotonic() + deadline_s, {}
    for role, p in procs.items():
        try:
            codes[role] = p.wait(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            codes[role] = "timeout"
    return codes


def run_distributed(tmp_path: Path, assets: Path, method_opts: list[str], *, model_dir: Path | None = None,
                    deadline_s: float = DEADLINE_S) -> Path:
    """Start server then clients, wait for all (bounded), always kill leftovers; return the output directory.

    ``assets`` holds the data file (and the model, unless ``model_dir`` names another one).
    """
    ports, out = free_ports(3), tmp_path / "out"
    procs: dict[str, subprocess.Popen] = {}
    logs = {role: open(tmp_path / f"{role}.log", "w") for role in ROLES}
    try:
        for role in ROLES:
            cmd = fs_command("fs-run", "--cfg", str(FS_CONFIGS / "distributed" / f"{role}.yaml"),
                             *role_opts(role, ports, assets, model_dir or assets, out), *method_opts)
            procs[role] = subprocess.Popen(cmd, cwd=tmp_path, env=fs_env(), stdout=logs[role],
                                           stderr=subprocess.STDOUT)
            if role == "server":
                wait_for_port(ports[0], procs[role], timeout=180)
        codes = wait_all(procs, deadline_s)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for fh in logs.values():
            fh.close()
    tails = {r: (tmp_path / f"{r}.log").read_text()[-3000:] for r in ROLES}
    assert codes == dict.fromkeys(ROLES, 0), f"exit codes {codes}\n" + "\n".join(f"== {r}\n{t}" for r, t in
                                                                              tails.items())
    return out


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return write_tiny_llm_assets(tmp_path_factory.mktemp("assets"))


def test_distributed_gmfl_run_completes_with_exact_bytes(tiny_llm, tmp_path):
    """FedIT + GMFL, 4 rounds over gRPC: every process exits 0; per-round bytes are the hand arithmetic; the
    server's and clients' FederatedScope monitors report the exact payload bytes each way."""
    out = run_distributed(tmp_path, tiny_llm, [])
    rows = summary(out / "server")["per_round"]
    # 2 clients x (8 LoRA tensors x 256 fp32 params + 8 B sample count); half the tensors frozen after round 2
    assert [r["uplink_bytes"] for r in rows] == [2 * 8200] * 2 + [2 * 4104] * 2
    assert [r["frozen_fraction"] for r in rows] == [0.0, 0.0, 0.5, 0.5]
    server = system_metrics(out / "server")[0]
    assert server["total_download_bytes"] == sum(r["uplink_bytes"] for r in rows)
    for role in ROLES[1:]:  # client ids follow the join order, so take each client's single row
        (client,) = system_metrics(out / expname(role)).values()
        assert client["total_upload_bytes"] == 2 * 8200 + 2 * 4104


def test_distributed_hafl_run_completes(tiny_llm, tmp_path):
    """HAFL through the same adapter over gRPC: every process exits 0 and the bytes add up each way."""
    out = run_distributed(tmp_path, tiny_llm, ["federate.method", "hafl", "gmfl.use", "False"])
    rows = summary(out / "server")["per_round"]
    assert len(rows) == 4 and all(r["uplink_bytes"] > 0 and r["rejected"] == 0 for r in rows)
    assert system_metrics(out / "server")[0]["total_download_bytes"] == sum(r["uplink_bytes"] for r in rows)


# -- the real pre-trained SmolLM2-135M-Instruct ----------------------------------------------------------------------
#: SmolLM2 run: 2 rounds, short sequences, 2 local steps, a handful of rows (a few minutes on two cores).
SMOL_RUN = ["federate.total_round_num", "2", "llm.tok_len", "64", "train.local_update_steps", "2"]
#: LoRA of the distributed YAMLs (q_proj, v_proj) and the HAFL run's r_max with its two truncated client ranks.
LORA_R, HAFL_R_MAX, HAFL_RANKS = 4, 8, (2, 8)
#: plain SGD, FederatedScope's default and its half-precision baselines' optimizer: torch's Adam/AdamW on float16
#: parameters turn a zero gradient (every lora_A at the first step, while lora_B is zero) into NaN, since eps=1e-8
#: underflows to 0 in float16 (0 / (sqrt(0) + 0)); fs_gmfl then rejects every update and the run exits 1.
HALF_SGD = ["train.optimizer.type", "SGD", "train.optimizer.lr", "0.01"]
#: deadline of a SmolLM2 run (float16 matmuls are slow on CPUs; the machine may be shared).
SMOL_DEADLINE_S = 900
SMOL_SKIP = "SmolLM2 not installed: bash scripts/install.sh --llm"


def smollm2_model_dir() -> Path:
    """The exported fp32 SmolLM2 directory: the cache if complete, else exported from the installed GGUF package
    (local, no download); skips with the install command when neither is there."""
    from fs_gmfl.errors import InputError
    from fs_gmfl.hosts.common import smollm2

    cached = smollm2.default_cache_dir()
    if smollm2.cache_problem(cached) is None:
        return cached
    try:
        smollm2.smollm2_package_dir()
    except InputError:
        pytest.skip(f"{SMOL_SKIP} (no complete export at {cached})")
    if smollm2.importlib.util.find_spec("gguf") is None:
        pytest.skip(f"{SMOL_SKIP} (gguf missing; no complete export at {cached})")
    return smollm2.smollm2_dir()


@pytest.fixture(scope="module")
def smollm2_assets(tmp_path_factory) -> tuple[Path, Path]:
    """(data root holding ``instructions.json``: 30 FederatedScope-LLM records, SmolLM2 model directory)."""
    model_dir = smollm2_model_dir()
    data_root = tmp_path_factory.mktemp("smol_data")
    (data_root / "instructions.json").write_text(json.dumps(arithmetic_rows(30, seed=5)), encoding="utf-8")
    return data_root, model_dir


def lora_module_shapes(model_dir: Path) -> list[tuple[int, int]]:
    """(in, out) features of every q_proj and v_proj, from the model's config.json (Llama attention)."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    hidden, head_dim = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q_out, v_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return [(hidden, q_out), (hidden, v_out)] * cfg["num_hidden_layers"]


def lora_tensor_numels(model_dir: Path, r: int) -> list[int]:
    """Elements of every LoRA tensor at rank ``r``: A is r x in, B is out x r."""
    return [n for fan_in, fan_out in lora_module_shapes(model_dir) for n in (r * fan_in, fan_out * r)]


def test_smollm2_lora_shapes_from_config(smollm2_assets):
    """SmolLM2-135M: 30 layers, hidden 576; q_proj 576 -> 576 (9 heads x 64), v_proj 576 -> 192 (3 kv heads x 64)."""
    shapes = lora_module_shapes(smollm2_assets[1])
    assert len(shapes) == 60 and set(shapes) == {(576, 576), (576, 192)}
    assert sum(lora_tensor_numels(smollm2_assets[1], 4)) == 30 * 4 * (576 + 576 + 576 + 192) == 230400


def test_distributed_smollm2_gmfl_refresh_with_exact_bytes(smollm2_assets, tmp_path):
    """SmolLM2 + FedIT + GMFL over gRPC, 2 rounds, mask refreshed after round 1 (ratio 0.25 + 0.25): every process
    exits 0, both clients' updates accepted each round, and the uplinks are the fp32 LoRA tensors minus the frozen
    ones, as summary.json and FederatedScope's monitors report."""
    data_root, model_dir = smollm2_assets
    out = run_distributed(tmp_path, data_root, [*SMOL_RUN, "gmfl.period", "1", "gmfl.c", "0.25", "gmfl.beta", "0.25",
                                                "gmfl.tie_policy", "exact_k"], model_dir=model_dir,
                          deadline_s=SMOL_DEADLINE_S)
    result = summary(out / "server")
    rows = result["per_round"]
    assert [(r["accepted"], r["rejected"]) for r in rows] == [(2, 0), (2, 0)]
    assert result["rejected_updates"]["total"] == 0 and result["uplink_dtype"] == "float32"
    numels = lora_tensor_numels(model_dir, LORA_R)
    full = sum(numels)                                      # 230400
    assert [r["frozen_fraction"] for r in rows] == [0.0, 0.5]  # 60 of the 120 LoRA tensors after the refresh
    frozen = round(rows[1]["frozen_numel_fraction"] * full)
    # 60 frozen tensors, each r x 576 (an A, or q_proj's B) or 192 x r (v_proj's B): frozen = 60*4*576 - k*4*384
    small_bs, rest = divmod(60 * LORA_R * 576 - frozen, LORA_R * (576 - 192))
    assert rest == 0 and 0 <= small_bs <= 30, frozen
    per_client = [4 * full + 8, 4 * (full - frozen) + 8]    # fp32 LoRA tensors + the 8-byte sample count
    assert [r["uplink_bytes"] for r in rows] == [2 * b for b in per_client]
    assert system_metrics(out / "server")[0]["total_download_bytes"] == 2 * sum(per_client)
    for role in ROLES[1:]:
        (client,) = system_metrics(out / expname(role)).values()
        assert client["total_upload_bytes"] == sum(per_client)


def test_distributed_smollm2_hafl_truncation_in_half_precision(smollm2_assets, tmp_path):
    """SmolLM2 + HAFL (truncation; client ranks 2 and 8 of r_max 8) with train.is_enable_half over gRPC: every
    process exits 0, every float16 upload is accepted, and the bytes are the truncated LoRA tensors in 2-byte
    elements plus int16 component indices and the sample count."""
    data_root, model_dir = smollm2_assets
    lora = (f"[{{'adapter_package': 'peft', 'adapter_method': 'lora', 'r': {HAFL_R_MAX}, 'lora_alpha': "
            f"{2 * HAFL_R_MAX}, 'lora_dropout': 0.0, 'target_modules': ['q_proj', 'v_proj']}}]")
    profiles = str([{"clients": [i], "rank": r} for i, r in enumerate(HAFL_RANKS)])
    out = run_distributed(tmp_path, data_root, [*SMOL_RUN, "federate.method", "hafl", "gmfl.use", "False",
                                                "train.is_enable_half", "True", "llm.adapter.args", lora,
                                                "hafl.scheme", "truncation", "hafl.profiles", profiles,
                                                *HALF_SGD, "train.local_update_steps", "1", "dataloader.batch_size",
                                                "1"], model_dir=model_dir, deadline_s=SMOL_DEADLINE_S)
    result = summary(out / "server")
    rows = result["per_round"]
    assert result["uplink_dtype"] == "float16" and result["rejected_updates"]["total"] == 0
    assert [(r["accepted"], r["rejected"]) for r in rows] == [(2, 0), (2, 0)]
    payload = sum(2 * sum(lora_tensor_numels(model_dir, r)) for r in HAFL_RANKS)   # 2 x 57600 x (2 + 8) = 1152000
    control = sum(60 * r * 2 + 8 for r in HAFL_RANKS)      # int16 indices (60 modules x r_k) + sample count
    assert payload == 1152000 and control == 1216
    assert [(r["uplink_payload_bytes"], r["uplink_control_bytes"]) for r in rows] == [(payload, control)] * 2
    assert system_metrics(out / "server")[0]["total_download_bytes"] == 2 * (payload + control)
    final = torch.load(out / "final.ckpt", map_location="cpu", weights_only=True)["model"]
    lora_b = [t for k, t in final.items() if "lora_B" in k]
    assert len(lora_b) == 60 and all(bool(torch.isfinite(t).all()) for t in final.values())
    assert any(bool(t.abs().sum()) for t in lora_b)         # lora_B starts at zero: the accepted updates moved it
