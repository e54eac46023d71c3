"""Quiet defaults (issue 28): valid settings that do less than they seem to are warned about at pre-flight.

HAFL without ``hafl.profiles`` is one full-rank profile (homogeneous LoRA); GMFL whose ``gmfl.period`` is not
below ``federate.total_round_num`` never freezes anything. Each is one warning line, logged by the simulator at
pre-flight and listed under ``warnings`` in ``summary.json``; the FederatedScope host logs the same lines through
:func:`~fs_gmfl.config.advice.log_config_warnings`.
"""

from __future__ import annotations

import logging

import pytest

from fs_gmfl.config.advice import config_warnings, log_config_warnings
from fs_gmfl.hosts.sim.runner import Simulation

pytestmark = pytest.mark.usefixtures("single_thread")

HAFL = ["federate.method", "hafl"]
PROFILES = ["hafl.scheme", "truncation", "hafl.profiles", "[{share: 0.5, rank: 2}, {share: 0.5, rank: 4}]"]


@pytest.mark.parametrize("overrides,fragments", [
    (HAFL, ["hafl.profiles is empty: every client trains all r_max = 4 rank-1 components",
            "set hafl.profiles, e.g. [{share: 0.5, freeze_ratio: 0.5}"]),
    ([*HAFL, "hafl.scheme", "truncation"], ["e.g. [{share: 0.5, rank: 2}, {share: 0.5, rank: 4}]"]),
    (["gmfl.use", "True"], ["gmfl.period 20 is not below federate.total_round_num 4", "no LoRA tensor is frozen",
                            "set gmfl.period below federate.total_round_num, e.g. 2"]),
    (["gmfl.use", "True", "gmfl.period", "4"], ["gmfl.period 4 is not below federate.total_round_num 4"]),
])
def test_a_quiet_default_gives_one_warning_naming_its_keys(tiny, overrides, fragments):
    """Each case: exactly one warning, one line, naming the keys and how to change them."""
    warnings = config_warnings(tiny(*overrides))
    assert len(warnings) == 1 and "\n" not in warnings[0]
    for fragment in fragments:
        assert fragment in warnings[0]


@pytest.mark.parametrize("overrides", [[], [*HAFL, *PROFILES], [*HAFL, "hafl.aggregation", "fedavg"],
                                       ["gmfl.use", "True", "gmfl.period", "3"], ["gmfl.period", "20"]])
def test_settings_that_do_what_they_say_give_no_warning(tiny, overrides):
    """FedIT; HAFL with profiles or as HomLoRA (aggregation fedavg, chosen on purpose); GMFL refreshing in time or
    switched off."""
    assert config_warnings(tiny(*overrides)) == []


def test_the_simulator_logs_the_warnings_at_preflight_and_lists_them_in_the_summary(tiny, caplog):
    """HAFL without profiles wrapped in GMFL with the default period: both lines logged once, both in summary.json."""
    cfg = tiny(*HAFL, "gmfl.use", "True", "federate.total_round_num", "1")
    with caplog.at_level(logging.WARNING, logger="fs_gmfl"):
        summary = Simulation(cfg, quiet=True).run()
    expected = config_warnings(cfg)
    assert len(expected) == 2
    assert [r.getMessage() for r in caplog.records if r.getMessage() in expected] == expected
    assert summary["warnings"][:2] == expected


def test_the_federatedscope_hook_logs_on_the_given_logger(tiny, caplog):
    """``log_config_warnings(run_cfg, logger)`` (the FederatedScope server's call) logs each line on that logger."""
    log = logging.getLogger("federatedscope.fs_gmfl.test")
    with caplog.at_level(logging.WARNING, logger=log.name):
        found = log_config_warnings(tiny(*HAFL), log)
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == found and len(found) == 1
