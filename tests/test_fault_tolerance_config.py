"""``fault_tolerance.*``: the deadlines of a distributed run are validated like every other key."""

from __future__ import annotations

import pytest

from fs_gmfl.config import load_config
from fs_gmfl.errors import ConfigError


def test_fault_tolerance_defaults_are_the_documented_ones():
    ft = load_config(None, []).fault_tolerance
    assert (ft.round_timeout_s, ft.min_replies, ft.join_timeout_s, ft.heartbeat_s, ft.client_timeout_s,
            ft.server_timeout_s, ft.rpc_timeout_s) == (1800.0, 1, 600.0, 5.0, 30.0, 600.0, 120.0)


@pytest.mark.parametrize("overrides, key", [
    (["fault_tolerance.round_timeout_s", "0"], "fault_tolerance.round_timeout_s"),
    (["fault_tolerance.round_timeout_s", "nan"], "fault_tolerance.round_timeout_s"),
    (["fault_tolerance.min_replies", "0"], "fault_tolerance.min_replies"),
    (["fault_tolerance.min_replies", "1.5"], "fault_tolerance.min_replies"),
    (["fault_tolerance.heartbeat_s", "-1"], "fault_tolerance.heartbeat_s"),
    (["fault_tolerance.rpc_timeout_s", "inf"], "fault_tolerance.rpc_timeout_s"),
    (["fault_tolerance.heartbeat_s", "20"], "fault_tolerance.client_timeout_s"),  # 30 <= 2 x 20
    (["fault_tolerance.server_timeout_s", "8"], "fault_tolerance.server_timeout_s"),  # 8 <= 2 x 5
])
def test_bad_fault_tolerance_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key
