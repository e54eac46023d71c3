"""Plots of run names in any script draw without warnings (issue #28).

An ``expname`` such as ``'Überprüfung_实验'`` once made matplotlib warn on stderr
for every character its font has no glyph for (eight lines per run). The
characters the font lacks are now spelled out as Python escapes, and ``$`` is
drawn as itself (no mathtext).
"""

from __future__ import annotations

import warnings

import pytest

from fs_gmfl.cli import main
from fs_gmfl.plots import drawable, plot_runs
from tests.conftest import TINY

NAME = "Überprüfung_实验"
SUMMARY = {"per_round": [{"round": 0, "test_acc": 0.5}, {"round": 1, "test_acc": 0.75, "uplink_bytes": 2048}]}


def test_characters_without_a_glyph_are_spelled_out():
    assert drawable(NAME) == "Überprüfung_\\u5b9e\\u9a8c"
    assert drawable("fedit s0 $x^{$") == "fedit s0 $x^{$"


def test_plot_of_a_non_ascii_name_writes_the_png_without_warnings(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = plot_runs([(NAME, SUMMARY)], tmp_path / "curves.png", title=f"{NAME} $x^{{$ 🙂")
    assert path.stat().st_size > 0
    assert [str(w.message) for w in caught] == []


@pytest.mark.usefixtures("single_thread")
def test_a_run_with_a_non_ascii_expname_plots_without_glyph_warnings(tmp_path, capsys):
    argv = ["run", "--cfg", "/dev/null", "--quiet", *TINY, "federate.total_round_num", "1", "outdir", str(tmp_path),
            "expname", NAME]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert (tmp_path / NAME / "curves.png").stat().st_size > 0
    glyphs = [str(w.message) for w in caught if "Glyph" in str(w.message)]
    assert glyphs == [] and "Glyph" not in capsys.readouterr().err
