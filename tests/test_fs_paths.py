"""Shipped FederatedScope configs run from any working directory, `outdir` alone moves every output, and
summary.json states how its byte counts relate to FederatedScope's monitor.

Skipped (with the reason shown) when FederatedScope is not importable; see docs/federatedscope.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("federatedscope", reason="FederatedScope (branch llm) is not installed: FederatedScope host "
                    "tests skipped")

from federatedscope.core.configs.config import global_cfg  # noqa: E402

from fs_host_helpers import FS_CONFIGS, ROOT, merged_like_main, run_fs, summary, system_metrics  # noqa: E402
from fs_gmfl.errors import ConfigError  # noqa: E402
from fs_gmfl.hosts.fs import register_all  # noqa: E402
from fs_gmfl.hosts.fs.assets import write_tiny_llm_assets  # noqa: E402

pytestmark = pytest.mark.fs_host

TINY_LLAMA = FS_CONFIGS / "gmfl_fedit_tiny_llama.yaml"


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_all()


def test_cfg_dir_and_outdir_placeholders_expand_to_absolute_paths(tmp_path):
    """{cfg_dir} is the YAML's directory (normalised), {outdir} follows an outdir override."""
    cfg = merged_like_main(TINY_LLAMA, ["outdir", str(tmp_path / "elsewhere")])
    assets = ROOT / ".assets" / "fs" / "tiny_llama"
    assert cfg.data.root == str(assets) and cfg.model.type == f"{assets}@huggingface_llm"
    assert cfg.federate.save_to == str(tmp_path / "elsewhere" / "gmfl_fedit_tiny_llama.ckpt")


def test_cfg_dir_without_a_known_file_is_a_config_error():
    cfg = global_cfg.clone()
    with pytest.raises(ConfigError) as err:
        cfg.merge_from_file(str(TINY_LLAMA))
    assert err.value.key == "data.root" and "{cfg_dir}" in str(err.value)


def test_shipped_config_runs_from_another_directory_with_only_outdir_overridden(tmp_path):
    """A copy of the project (YAML + assets) run from an unrelated directory with only `outdir` set: the
    checkpoints land under that outdir (their parent is created), and summary.json's training bytes plus its
    evaluation broadcasts equal FederatedScope's monitor totals."""
    project = tmp_path / "project"
    config = project / "yaml_configs" / "fs" / TINY_LLAMA.name
    config.parent.mkdir(parents=True)
    shutil.copy(TINY_LLAMA, config)
    write_tiny_llm_assets(project / ".assets" / "fs")
    cwd, out = tmp_path / "cwd", tmp_path / "new" / "outputs"
    cwd.mkdir()
    run_fs("fs-run", "--cfg", str(config), "outdir", str(out), cwd=cwd)
    assert (out / "gmfl_fedit_tiny_llama.ckpt").is_file() and (out / "final_gmfl_fedit_tiny_llama.ckpt").is_file()
    assert not (cwd / "exp").exists()
    run_dir = out / "gmfl_fedit_tiny_llama"
    result, monitor = summary(run_dir), system_metrics(run_dir)
    evaluation = result["evaluation_broadcasts"]
    assert evaluation["broadcasts"] == 4  # eval.freq 1: after rounds 1-3, then the final evaluation, ...
    adapter_bytes = 8 * 256 * 4           # 8 LoRA tensors x 256 fp32 parameters
    assert evaluation["bytes"] == evaluation["broadcasts"] * 3 * adapter_bytes  # ... each to all 3 clients
    assert monitor[0]["total_upload_bytes"] == result["comm"]["downlink_bytes"] + evaluation["bytes"]
    assert sum(monitor[c]["total_upload_bytes"] for c in (1, 2, 3)) == result["comm"]["uplink_bytes"]
