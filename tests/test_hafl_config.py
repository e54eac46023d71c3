"""HAFL configuration: profiles, capacities, and rejection of invalid settings at load time."""

from __future__ import annotations

import pytest

from fs_gmfl.cli import main
from fs_gmfl.config import load_config
from fs_gmfl.core.hafl import client_capacities, profile_report
from fs_gmfl.errors import ConfigError

BASE = ["federate.method", "hafl", "federate.client_num", "10", "llm.adapter.args", "[{r: 16}]"]
PAPER_TRUNCATION = "[{share: 0.33, rank: 2}, {share: 0.33, rank: 4}, {share: 0.34, rank: 16}]"
PAPER_FREEZING = "[{share: 0.33, freeze_ratio: 0.875}, {share: 0.33, freeze_ratio: 0.75}, {share: 0.34, freeze_ratio: 0}]"


def hafl(*overrides: str):
    return load_config(None, [*BASE, *overrides])


@pytest.mark.parametrize("overrides,key,allowed", [
    (["hafl.profiles", "[{share: 0.5, rank: 2}, {share: 0.4, rank: 4}]", "hafl.scheme", "truncation"],
     "hafl.profiles[1].share", "sum to 0.9"),
    (["hafl.profiles", "[{share: 1.0, rank: 0}]", "hafl.scheme", "truncation"], "hafl.profiles[0].rank", "[1, inf)"),
    (["hafl.profiles", "[{share: 1.0, rank: 17}]", "hafl.scheme", "truncation"], "hafl.profiles[0].rank",
     "r_max = llm.adapter.args[0].r = 16"),
    (["hafl.profiles", "[{share: 1.0, freeze_ratio: 1.5}]"], "hafl.profiles[0].freeze_ratio", "[0.0, 1.0]"),
    (["hafl.profiles", "[{share: 1.0, freeze_ratio: -0.1}]"], "hafl.profiles[0].freeze_ratio", "[0.0, 1.0]"),
    (["hafl.profiles", "[{share: 1.0, rank: 2}]"], "hafl.profiles[0].freeze_ratio", "scheme 'freezing'"),
    (["hafl.profiles", "[{share: 1.0, freeze_ratio: 0.5}]", "hafl.scheme", "truncation"], "hafl.profiles[0].rank",
     "scheme 'truncation'"),
    (["hafl.profiles", "[{share: 0.5, clients: [1], freeze_ratio: 0}]"], "hafl.profiles[0].share",
     "exactly one of share or clients"),
    (["hafl.profiles", "[{freeze_ratio: 0}]"], "hafl.profiles[0].share", "exactly one of share or clients"),
    (["hafl.profiles", "[{clients: [0, 12], freeze_ratio: 0}, {share: 1.0, freeze_ratio: 0.5}]"],
     "hafl.profiles[0].clients", "[0, 9]"),
    (["hafl.profiles", "[{clients: [0, 1], freeze_ratio: 0}, {clients: [1], freeze_ratio: 0.5}]"],
     "hafl.profiles[1].clients", "repeated: [1]"),
    (["hafl.profiles", "[{clients: [0, 1, 2], freeze_ratio: 0}]"], "hafl.profiles", "clients without a profile"),
    (["hafl.profiles", PAPER_FREEZING, "hafl.aggregation", "fedavg"], "hafl.aggregation", "rho0.875, rho0.75"),
    (["hafl.aggregation", "zero_padding", "hafl.norm_scope", "rank1"], "hafl.norm_scope", "one weight per client"),
    (["hafl.beta1", "1.0"], "hafl.beta1", "(0.0, 1.0)"),
    (["gmfl.use", "True", "gmfl.downlink", "stateful_sync"], "gmfl.downlink",
     "'stateless' with federate.method 'hafl'"),
])
def test_invalid_hafl_settings_are_rejected_at_load(overrides, key, allowed):
    """Each bad setting raises ConfigError naming the exact key and what is allowed."""
    with pytest.raises(ConfigError) as err:
        hafl(*overrides)
    assert err.value.key == key
    assert allowed in str(err.value)


def test_cli_prints_one_line_and_exits_2(capsys, tmp_path):
    """A bad profile stops `fs-gmfl run` before anything starts: one line, exit code 2."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("federate: {method: hafl}\nhafl: {scheme: truncation, profiles: [{share: 1.0, rank: 0}]}\n")
    assert main(["run", "--cfg", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hafl.profiles[0].rank" in err[0]


@pytest.mark.parametrize("ratio,n_min,expected", [(0.875, 1, 2), (0.75, 1, 4), (0.0, 1, 16), (1.0, 1, 1),
                                                  (1.0, 0, 0), (0.97, 0, 0), (0.97, 1, 1), (0.5, 10, 10),
                                                  (0.90625, 1, 2)])
def test_trained_components_of_freezing_profiles(ratio, n_min, expected):
    """n_k = clip(round((1 - rho) * r_max), n_min, r_max), halves rounded up (0.09375 * 16 = 1.5 -> 2)."""
    cfg = hafl("hafl.profiles", f"[{{share: 1.0, freeze_ratio: {ratio}}}]", "hafl.n_min", str(n_min))
    assert cfg.hafl.trained_components(cfg.hafl.profiles[0], 16) == expected


def test_paper_profiles_assignment_is_reported():
    """100 clients with the paper's shares: 33/33/34 clients with n_k 2/4/16, every client exactly once."""
    cfg = load_config(None, [*BASE, "federate.client_num", "100", "hafl.scheme", "truncation",
                             "hafl.profiles", PAPER_TRUNCATION])
    profile_of, trained = client_capacities(cfg.hafl, num_clients=100, r_max=16, seed=cfg.seed)
    rows = profile_report(cfg.hafl, profile_of, 16)
    assert [(r["name"], r["rank"], r["trained_components"], r["clients"]) for r in rows] == [
        ("r2", 2, 2, 33), ("r4", 4, 4, 33), ("r16", 16, 16, 34)]
    assert sorted(c for r in rows for c in r["client_ids"]) == list(range(100))
    assert all(trained[c] == r["trained_components"] for r in rows for c in r["client_ids"])


def test_explicit_ids_and_shares_combine():
    """Explicit ids take their clients; shares split the rest; no profiles means full rank for everybody."""
    cfg = hafl("hafl.profiles", "[{clients: [3, 4], freeze_ratio: 0.75, name: weak}, {share: 1.0, freeze_ratio: 0}]")
    profile_of, trained = client_capacities(cfg.hafl, num_clients=10, r_max=16, seed=0)
    assert [trained[c] for c in range(10)] == [16, 16, 16, 4, 4, 16, 16, 16, 16, 16]
    assert profile_report(cfg.hafl, profile_of, 16)[0]["name"] == "weak"
    plain = hafl()
    assert client_capacities(plain.hafl, num_clients=10, r_max=16, seed=0)[1] == [16] * 10
