"""``fs-gmfl bench aggregate``: one measurement on a tiny adapter, in this process (the driver uses children)."""

from __future__ import annotations

import json

import pytest

from fs_gmfl.bench.aggregate import adapter_keys, main, parse_args, plan, uplink_bytes

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("method", ["fedit", "hafl"])
@pytest.mark.parametrize("feed", ["streamed", "listed"])
def test_one_measurement_accepts_every_uplink_and_reports_memory_and_time(capsys, method, feed):
    """Six uplinks of a 2-layer adapter: all accepted (else the child exits), RSS, seconds and CPU seconds reported."""
    assert main(["--quick", "--child", f"{method},6,{feed}"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["method"], result["clients"], result["feed"]) == (method, 6, feed)
    assert result["peak_rss_bytes"] >= result["rss_before_bytes"] > 0
    assert result["aggregate_s"] > 0 and result["make_uplinks_s"] > 0
    assert result["aggregate_cpu_s"] > 0 and result["per_uplink_cpu_ms"] == result["aggregate_cpu_s"] / 6 * 1000


def test_the_default_shapes_are_llama_7b_q_v_at_rank_16():
    """32 layers x q_proj, v_proj, hidden 4096, r 16, fp32: 33.5 MB per uplink; the plan covers both feeds."""
    args = parse_args([])
    assert len(adapter_keys(args.layers)) == 64 and uplink_bytes(args) == 33_554_432
    assert ("fedit", 1000, "streamed") in plan(args) and ("fedit", 100, "listed") in plan(args)
    assert ("hafl", 1000, "streamed") in plan(parse_args([])) and \
        ("hafl", 1000, "streamed") not in plan(parse_args(["--max-clients", "hafl=100"]))


@pytest.mark.parametrize("option, value, reason", [
    ("--clients", "-1", "outside 1..1000000"), ("--clients", "nan", "not an integer"),
    ("--clients", "", "at least one"), ("--clients", "99999999999999999999", "outside 1..1000000"),
    ("--methods", "fedkrso", "subset of fedit, hafl"), ("--max-clients", "fedit=x", "not an integer"),
    ("--max-clients", "fedit", "METHOD=N"), ("--rank", "0", "outside"), ("--hidden", "1e99", "not an integer"),
])
def test_bad_options_are_one_line_with_exit_2(option, value, reason, capsys):
    """A bad option names itself and what is allowed (argparse's line), exit 2, before any run starts."""
    from fs_gmfl.bench.aggregate import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args([option, value])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and option in err and reason in err


def test_options_parse_into_lists_and_limits():
    from fs_gmfl.bench.aggregate import parse_args, plan

    args = parse_args(["--clients", "10, 100", "--listed-clients", "", "--methods", "hafl",
                       "--max-clients", "hafl=50"])
    assert (args.clients, args.listed_clients, args.methods, args.max_clients) == ([10, 100], [], ["hafl"],
                                                                                   {"hafl": 50})
    assert plan(args) == [("hafl", 10, "streamed")]
