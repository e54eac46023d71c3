"""Plots of run summaries (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_points(summary: Mapping[str, Any], metric: str = "test_acc") -> tuple[list[int], list[float], list[float]]:
    """Rounds, metric values and cumulative uplink MiB at each evaluated round of a summary."""
    rounds, values, uplink = [], [], []
    cumulative = 0
    for row in summary["per_round"]:
        cumulative += row.get("uplink_bytes", 0)
        if metric in row:
            rounds.append(row["round"])
            values.append(row[metric])
            uplink.append(cumulative / MIB)
    return rounds, values, uplink


def drawable(text: str) -> str:
    """``text`` with each character the plots' font has no glyph for written as a Python escape (``\\u5b9e``).

    Run names may hold any character (``expname 'Überprüfung_实验'``); matplotlib
    draws a missing glyph as an empty box and warns once per character and
    drawing, so such characters are spelled out instead.
    """
    from matplotlib.font_manager import FontProperties, findfont, get_font

    glyphs = get_font(findfont(FontProperties())).get_charmap()
    return "".join(c if ord(c) in glyphs else c.encode("unicode_escape").decode("ascii") for c in text)


def plot_runs(runs: Sequence[tuple[str, Mapping[str, Any]]], path: str | Path, *, metric: str = "test_acc",
              title: str = "") -> Path:
    """Plot ``metric`` against round and against cumulative uplink MiB for labelled summaries.

    Labels and title are drawn as plain text (no ``$...$`` mathtext), with
    characters the font lacks spelled out (:func:`drawable`).
    """
    plt = _pyplot()
    with plt.rc_context({"text.parse_math": False}):
        return _draw(plt, runs, Path(path), metric, drawable(title))


def _draw(plt: Any, runs: Sequence[tuple[str, Mapping[str, Any]]], path: Path, metric: str, title: str) -> Path:
    fig, (ax_round, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    for label, summary in runs:
        rounds, values, uplink = accuracy_points(summary, metric)
        ax_round.plot(rounds, values, marker=".", label=drawable(label))
        ax_bytes.plot(uplink, values, marker=".", label=drawable(label))
    ax_round.set_xlabel("round")
    ax_bytes.set_xlabel("cumulative uplink (MiB)")
    for ax in (ax_round, ax_bytes):
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    ax_bytes.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
