"""``fs-gmfl bench aggregate``: one measurement on a tiny adapter, in this process (the driver uses children)."""

from __future__ import annotations

import json

import pytest

from fs_gmfl.bench.aggregate import adapter_keys, main, parse_args, plan, uplink_bytes

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("method", ["fedit", "hafl"])
@pytest.mark.parametrize("feed", ["streamed", "listed"])
def test_one_measurement_accepts_every_uplink_and_reports_memory_and_time(capsys, method, feed):
    """Six uplinks of a 2-layer adapter: all accepted (else the child exits), RSS and seconds reported."""
    assert main(["--quick", "--child", f"{method},6,{feed}"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["method"], result["clients"], result["feed"]) == (method, 6, feed)
    assert result["peak_rss_bytes"] >= result["rss_before_bytes"] > 0
    assert result["aggregate_s"] > 0 and result["make_uplinks_s"] > 0


def test_the_default_shapes_are_llama_7b_q_v_at_rank_16():
    """32 layers x q_proj, v_proj, hidden 4096, r 16, fp32: 33.5 MB per uplink; the plan covers both feeds."""
    args = parse_args([])
    assert len(adapter_keys(args.layers)) == 64 and uplink_bytes(args) == 33_554_432
    assert ("fedit", 1000, "streamed") in plan(args) and ("fedit", 100, "listed") in plan(args)
    assert ("hafl", 1000, "streamed") in plan(parse_args([])) and \
        ("hafl", 1000, "streamed") not in plan(parse_args(["--max-clients", "hafl=100"]))
