"""FederatedScope-LLM's own baseline configs with one fs_gmfl switch, command-line overrides in every check, and
half precision (``train.is_enable_half: True``, set by every baseline) for every method.

The baseline YAMLs are read from the installed FederatedScope tree at test time (never copied here); the only
other edits are local paths (a tiny Llama and a local instruction file built below) and two rounds.
Skipped (with the reason shown) when FederatedScope is not importable; see docs/federatedscope.md.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

federatedscope = pytest.importorskip("federatedscope", reason="FederatedScope (branch llm) is not installed: "
                                     "FederatedScope host tests skipped")


from fs_host_helpers import fs_command, fs_env, merged_like_main  # noqa: E402
from fs_gmfl.core.comm import CommLedger  # noqa: E402
from fs_gmfl.core.message import Message  # noqa: E402
from fs_gmfl.core.protocol import RoundReport  # noqa: E402
from fs_gmfl.hosts.fs import run as fs_run  # noqa: E402
from fs_gmfl.hosts.fs.workers import FsGmflServer, to_global_dtype  # noqa: E402
from fs_gmfl.errors import ConfigError  # noqa: E402
from fs_gmfl.hosts.fs import register_all  # noqa: E402
from fs_gmfl.hosts.fs.assets import arithmetic_rows, write_tiny_llm_assets  # noqa: E402

pytestmark = pytest.mark.fs_host

BASELINES = Path(federatedscope.__file__).resolve().parent / "llm" / "baseline" / "exp_yaml"
ALPACA = BASELINES / "alpaca" / "alpaca_federate.yaml"
DOLLY_META = BASELINES / "dolly_meta" / "dolly_meta_federate.yaml"
if not ALPACA.is_file() or not DOLLY_META.is_file():
    pytest.skip(f"FederatedScope's baseline YAMLs are not in {BASELINES} (install the llm branch editable: "
                "pip install --no-deps -e <FederatedScope checkout>)", allow_module_level=True)

#: rows of the local data file: alpaca's 0.1 % validation split must give each of its 3 clients a row, and
#: dolly_meta's 1 % test split must hold each of its 8 categories (its `meta` splitter makes one client of each).
ROWS, CATEGORIES = 4000, 8
#: LoRA r=8 (the baselines' rank) on q_proj and v_proj (peft's default for Llama) of 2 layers, hidden 64.
LORA_PARAMS_PER_CLIENT = 2 * 2 * (8 * 64 + 64 * 8)


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_all()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny Llama directory holding ``rows.json``: ROWS instructions in CATEGORIES categories."""
    model_dir = write_tiny_llm_assets(tmp_path_factory.mktemp("baseline_assets"))
    rows = arithmetic_rows(ROWS, seed=3)
    for i, row in enumerate(rows):
        row["category"] = f"topic_{i % CATEGORIES}"
    (model_dir / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    return model_dir


def local_paths(assets: Path, out: Path) -> list[str]:
    """The only edits to a baseline besides the method switch: local model and data, outputs, and 2 rounds."""
    return ["data.root", str(assets), "data.type", "rows.json@llm", "model.type", f"{assets}@huggingface_llm",
            "outdir", str(out), "federate.save_to", str(out / "run.ckpt"), "federate.total_round_num", "2"]


def run_baseline(baseline: Path, assets: Path, out: Path, *switch: str) -> subprocess.CompletedProcess[str]:
    """``fs-gmfl fs-run --cfg <baseline> <local paths> <switch>`` in ``out`` (its exit status is not checked)."""
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(fs_command("fs-run", "--cfg", str(baseline), *local_paths(assets, out), *switch),
                          cwd=out, env=fs_env(), capture_output=True, text=True, timeout=420)


def run_summary(out: Path) -> dict:
    """summary.json of the run under ``out`` (FederatedScope's default expname nests the model path)."""
    (path,) = list(out.rglob("summary.json"))
    return json.loads(path.read_text(encoding="utf-8"))


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-5000:]}"


def assert_every_half_update_accepted(summary: dict, clients: int) -> None:
    """Two rounds, every client's float16 update accepted, none rejected."""
    assert summary["uplink_dtype"] == "float16"
    assert summary["accepted_updates"] == 2 * clients
    assert summary["rejected_updates"]["total"] == 0 and summary["rejected_updates"]["mostly_rejected_rounds"] == []
    assert [r["accepted"] for r in summary["per_round"]] == [clients, clients]


def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final_run.ckpt", map_location="cpu", weights_only=True)["model"]


# -- one switch ---------------------------------------------------------------------------------------------
def test_gmfl_use_on_federatescope_default_fedavg_runs_fedit_with_gmfl(assets, tmp_path):
    """alpaca_federate.yaml + `gmfl.use True`: fedavg becomes FedIT + GMFL, llmtrainer becomes fs_gmfl's trainer
    (both logged); half-precision uploads are all accepted and the global float16 adapter moves."""
    result = run_baseline(ALPACA, assets, tmp_path, "gmfl.use", "True")
    assert_ok(result)
    log = result.stdout + result.stderr
    assert "fs_gmfl: federate.method 'fedavg' -> 'fedit'" in log
    assert "fs_gmfl: trainer.type 'llmtrainer' -> 'fs_gmfl_llmtrainer'" in log
    summary = run_summary(tmp_path)
    assert summary["method"] == "fedit+gmfl"
    assert_every_half_update_accepted(summary, clients=3)
    # every full-rank fp16 upload: LORA_PARAMS_PER_CLIENT x 2 B, plus the sample count control entry (8 B)
    assert [r["uplink_payload_bytes"] for r in summary["per_round"]] == [3 * LORA_PARAMS_PER_CLIENT * 2] * 2
    final = final_adapter(tmp_path)
    assert len(final) == 8 and all(t.dtype == torch.float16 for t in final.values())
    assert any(bool(t.abs().sum()) for k, t in final.items() if "lora_B" in k)  # lora_B starts at zero


def test_hafl_truncation_in_half_precision_accepts_every_rank(assets, tmp_path):
    """alpaca_federate.yaml + `federate.method hafl` + truncation profiles (ranks 2 and 8): the rank-2 client's
    model is built in float16 too, so all 3 uploads of both rounds are accepted (issue: 'lora_A.weight has
    dtype torch.float32, expected torch.float16'); its upload is a quarter of a full-rank one."""
    result = run_baseline(ALPACA, assets, tmp_path, "federate.method", "hafl", "hafl.scheme", "truncation",
                          "hafl.profiles", "[{'share': 0.34, 'rank': 2}, {'share': 0.66, 'rank': 8}]")
    assert_ok(result)
    summary = run_summary(tmp_path)
    assert_every_half_update_accepted(summary, clients=3)
    full = LORA_PARAMS_PER_CLIENT * 2
    assert [r["uplink_payload_bytes"] for r in summary["per_round"]] == [2 * full + full // 4] * 2


@pytest.mark.slow
def test_fedhft_on_dolly_meta_with_eight_clients(assets, tmp_path):
    """dolly_meta_federate.yaml (8 clients by category, test-split evaluation) + `federate.method fedhft`:
    FederatedScope's evaluation needs FedHFT's global evaluation, which is its default under FederatedScope."""
    result = run_baseline(DOLLY_META, assets, tmp_path, "federate.method", "fedhft")
    assert_ok(result)
    assert_every_half_update_accepted(run_summary(tmp_path), clients=8)


@pytest.mark.slow
@pytest.mark.parametrize("switch", [("federate.method", "fedit"), ("federate.method", "ffa_lora"),
                                    ("federate.method", "hafl")], ids=["fedit", "ffa_lora", "hafl-freezing"])
def test_other_methods_in_half_precision(assets, tmp_path, switch):
    """The remaining hostable methods on alpaca_federate.yaml: every float16 upload accepted."""
    result = run_baseline(ALPACA, assets, tmp_path, *switch)
    assert_ok(result)
    assert_every_half_update_accepted(run_summary(tmp_path), clients=3)


def bare_server(outdir: Path) -> FsGmflServer:
    """An FsGmflServer holding only what record_round and the outcome check use (no FederatedScope run)."""
    server = object.__new__(FsGmflServer)
    server._cfg = SimpleNamespace(outdir=str(outdir))
    server.method = SimpleNamespace(strategy=SimpleNamespace(name="fedit+gmfl"), info={})
    server.total_round_num, server.wire_dtype, server.ledger = 2, torch.float16, CommLedger()
    server.rounds, server.rejections, server.accepted_total, server.mostly_rejected_rounds = {}, {}, 0, []
    server.evaluation, server.warnings = {"broadcasts": 0, "bytes": 0}, []
    return server


def test_rounds_with_every_update_rejected_warn_each_round_and_end_with_exit_1(tmp_path, caplog, capsys):
    """Each such round warns with the counts and is listed in summary.json; the launcher's exit status is 1."""
    server = bare_server(tmp_path)
    for rnd in (1, 2):
        server.record_round(rnd, RoundReport(rejected={0: "non-finite", 1: "non-finite", 2: "wrong dtype: x"}))
    assert [m for m in caplog.messages if "updates rejected" in m] == [
        "round 1: 3 of 3 updates rejected; 0 accepted since the start of the run",
        "round 2: 3 of 3 updates rejected; 0 accepted since the start of the run"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["accepted_updates"] == 0 and summary["rejected_updates"]["mostly_rejected_rounds"] == [1, 2]
    assert summary["rejected_updates"]["by_reason"] == {"non-finite": 4, "wrong dtype": 2}
    assert server.never_accepted and fs_run._outcome([server]) == fs_run.EXIT_NOTHING_ACCEPTED
    assert capsys.readouterr().err.startswith("fs-gmfl: error: no client update was accepted in 2 aggregated "
                                              "round(s) (6 rejected)")


def test_one_accepted_update_makes_a_mostly_rejected_run_exit_0(tmp_path, caplog):
    server = bare_server(tmp_path)
    server.record_round(1, RoundReport(accepted=[1], rejected={0: "non-finite", 2: "non-finite"}))
    server.record_round(2, RoundReport(accepted=[0, 1, 2]))
    assert [m for m in caplog.messages if "updates rejected" in m] == [
        "round 1: 2 of 3 updates rejected; 1 accepted since the start of the run"]
    assert not server.never_accepted and fs_run._outcome([server]) == 0


def test_a_float32_upload_in_a_half_precision_run_is_rejected_naming_the_wire_dtype():
    """The host checks the clients' training dtype, then casts exactly to the strategy's global dtype."""
    reference = {"a": torch.zeros(2, dtype=torch.float32)}
    half = Message({"a": torch.tensor([0.5, -1.25], dtype=torch.float16)}, {"n": torch.tensor(3)})
    assert to_global_dtype(half, reference, torch.float16) is None
    assert half.tensors["a"].dtype == torch.float32 and half.tensors["a"].tolist() == [0.5, -1.25]
    assert half.control["n"].dtype == torch.int64
    single = Message({"a": torch.zeros(2)})
    assert to_global_dtype(single, reference, torch.float16) == (
        "wrong dtype: 'a' has dtype torch.float32, expected torch.float16 (the clients' training dtype)")


# -- command-line overrides take part in every check ------------------------------------------------------
def test_an_override_fixes_a_file_value_before_the_file_is_checked(tmp_path):
    """The file's invalid gmfl.c and non-fs_gmfl method are checked only as the command line leaves them."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(ALPACA.read_text() + "\ngmfl: {use: True, c: 3.0}\n", encoding="utf-8")
    cfg = merged_like_main(bad, ["gmfl.c", "0.2", "federate.method", "ffa_lora"])
    assert cfg.gmfl.c == 0.2 and cfg.federate.method == "ffa_lora" and cfg.trainer.type == "fs_gmfl_llmtrainer"


@pytest.mark.parametrize("file_extra, opts, value, source", [
    ("", ["gmfl.use", "True", "gmfl.c", "3"], 3.0, "the command line"),
    ("\ngmfl: {use: True, c: 3.0}\n", ["federate.total_round_num", "2"], 3.0, "the file"),
    ("\ngmfl: {use: True, c: 0.5}\n", ["gmfl.c", "1.5"], 1.5, "the command line"),
])
def test_an_error_names_the_effective_value_and_its_source(tmp_path, file_extra, opts, value, source):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(ALPACA.read_text() + file_extra, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        merged_like_main(cfg_file, opts)
    assert err.value.key == "gmfl.c" and err.value.value == value
    assert f"[value from {source}" in str(err.value)


def test_the_launcher_reports_the_command_line_value_in_one_line(tmp_path):
    """Through `fs-gmfl fs-run`: exit 2 and one line naming the overridden value and the command line."""
    result = subprocess.run(fs_command("fs-run", "--cfg", str(ALPACA), "gmfl.use", "True", "gmfl.c", "3"),
                            cwd=tmp_path, env=fs_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "fs-gmfl: error: config key 'gmfl.c' = 3.0 is not allowed: a number in [0.0, 1.0] "
        "[value from the command line]")


@pytest.mark.parametrize("opts, method, trainer", [
    (["gmfl.use", "True"], "fedit", "fs_gmfl_llmtrainer"),
    (["federate.method", "hafl"], "hafl", "fs_gmfl_llmtrainer"),
    (["federate.method", "fedhft"], "fedhft", "fs_gmfl_llmtrainer"),
    ([], "fedavg", "llmtrainer"),  # no switch: FederatedScope's own FedAvg and trainer, untouched
], ids=["gmfl", "hafl", "fedhft", "no-switch"])
def test_one_switch_resolves_method_and_trainer_of_an_unmodified_baseline(opts, method, trainer):
    cfg = merged_like_main(ALPACA, opts)
    assert (cfg.federate.method.lower(), cfg.trainer.type) == (method, trainer)  # FederatedScope: "FedAvg"
