"""Configuration loading: defaults, overrides, and one clear error per bad input."""

from __future__ import annotations

import pytest

from fs_gmfl.config import load_config
from fs_gmfl.config.fields import iter_keys
from fs_gmfl.config.loader import apply_overrides, config_to_yaml, read_yaml
from fs_gmfl.config.schema import RunConfig
from fs_gmfl.errors import ConfigError, InputError


def test_defaults_and_overrides():
    """KEY VALUE overrides are parsed as YAML scalars and land in the typed config."""
    cfg = load_config(None, ["gmfl.use", "True", "gmfl.c", "0.2", "train.optimizer.lr", "1e-3",
                             "llm.adapter.args", "[{r: 16, lora_alpha: 32, target_modules: [query]}]"])
    assert cfg.gmfl.use is True and cfg.gmfl.c == 0.2 and cfg.train.optimizer.lr == 0.001
    assert cfg.lora.r == 16 and cfg.lora.target_modules == ["query"]
    assert cfg.gmfl.beta == 0.05 and cfg.gmfl.period == 20 and cfg.gmfl.tie_policy == "strict"


def test_yaml_file_then_overrides(tmp_path):
    """A file is read first, then overrides win."""
    path = tmp_path / "c.yaml"
    path.write_text("federate:\n  total_round_num: 7\n  client_num: 5\ngmfl:\n  use: True\n  period: 3\n")
    cfg = load_config(path, ["gmfl.period", "4"])
    assert (cfg.federate.total_round_num, cfg.federate.client_num, cfg.gmfl.period) == (7, 5, 4)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    """config.yaml of a run loads back to the same configuration."""
    cfg = load_config(None, ["gmfl.use", "True", "data.splitter", "lda", "data.splitter_args", "[{alpha: 0.3}]"])
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


BAD = [
    (["gmfl.cc", "1"], "gmfl.cc", "did you mean 'gmfl.c'"),
    (["nonsense", "1"], "nonsense", "unknown config key"),
    (["gmfl.c", "1.5"], "gmfl.c", "[0.0, 1.0]"),
    (["gmfl.c", "abc"], "gmfl.c", "expected a number"),
    (["gmfl.period", "0"], "gmfl.period", "[1, inf)"),
    (["gmfl.period", "2.5"], "gmfl.period", "expected an integer"),
    (["gmfl.use", "yes please"], "gmfl.use", "expected a boolean"),
    (["gmfl.tie_policy", "loose"], "gmfl.tie_policy", "'strict', 'exact_k'"),
    (["gmfl.use", "True", "gmfl.c", "0.9", "gmfl.max_ratio", "0.5"], "gmfl.c", "at most gmfl.max_ratio"),
    (["federate.method", "nope"], "federate.method", "one of"),
    (["federate.client_num", "0"], "federate.client_num", "[1, inf)"),
    (["federate.sample_client_num", "11"], "federate.sample_client_num", "at most federate.client_num"),
    (["federate.sample_client_rate", "0"], "federate.sample_client_rate", "(0, 1]"),
    (["data.splits", "[0.5, 0.2]"], "data.splits", "three fractions"),
    (["data.splits", "[0.5, 0.2, 0.2]"], "data.splits", "summing to 1"),
    (["data.splitter", "lda", "data.splitter_args", "[{alpha: 0}]"], "data.splitter_args", "alpha"),
    (["data.splitter", "iid", "data.splitter_args", "[{alpha: 1}]"], "data.splitter_args", "for splitter 'iid'"),
    (["llm.adapter.args", "[{r: 0}]"], "llm.adapter.args[0].r", "[1, inf)"),
    (["llm.adapter.args", "[]"], "llm.adapter.args", "exactly one"),
    (["llm.adapter.args", "[{rank: 4}]"], "llm.adapter.args[0].rank", "unknown config key"),
    (["llm.adapter.use", "False"], "llm.adapter.use", "True for federate.method"),
    (["train.optimizer.type", "Adagrad"], "train.optimizer.type", "'AdamW', 'Adam', 'SGD'"),
    (["eval.split", "[train]"], "eval.split", "'val', 'test'"),
    (["model.num_heads", "3"], "model.num_heads", "divisor"),
    (["federate", "5"], "federate", "expected a mapping"),
    (["gmfl.c.x", "1"], "gmfl.c", "expected a number"),
    (["gmfl.c", "0.1", "gmfl.c.x", "1"], "gmfl.c", "a mapping, to set 'gmfl.c.x'"),
]


@pytest.mark.parametrize("overrides,key,fragment", BAD)
def test_bad_config_names_key_value_and_allowed(overrides, key, fragment):
    """Each bad value raises one ConfigError naming the key and what is allowed."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_odd_number_of_override_words():
    """A key without value is a ConfigError."""
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        apply_overrides({}, ["gmfl.c"])


@pytest.mark.parametrize("content,fragment", [
    ("a: [1, 2", "not valid YAML at line"),
    ("- 1\n- 2\n", "must hold a mapping"),
])
def test_bad_yaml_file(tmp_path, content, fragment):
    """Broken YAML or a non-mapping file is an InputError with the position."""
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(InputError, match=fragment):
        read_yaml(path)


def test_missing_config_file():
    """A missing file is an InputError naming it."""
    with pytest.raises(InputError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_every_key_has_help():
    """Every leaf key is documented (fs-gmfl keys prints these)."""
    keys = list(iter_keys(RunConfig))
    assert len(keys) > 40
    missing = [k for k, _, _, meta, _ in keys if not meta.get("help")]
    assert missing == []
