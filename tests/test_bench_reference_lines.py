"""The FedHFT benchmark's tables carry the majority-class reference row (hand-computed mean ± std)."""

from __future__ import annotations

import argparse

from fs_gmfl.bench.fedhft import markdown, summarise


def record(seed: int, majority: float | None) -> dict:
    """A benchmark record with every field the tables read; the test split's majority rate is ``majority``."""
    rec = {"dataset": "news_articles", "method": "fedit", "seed": seed, "personalised_acc": 0.1,
           "global_test_acc": 0.12, "majority_baseline": 0.75, "uplink_bytes_per_round": 2**20,
           "downlink_bytes_per_round": 2**20, "full_model_params": 1000}
    for level in range(3):
        rec |= {f"personalised_acc_level{level}": 0.1, f"uplink_bytes_level{level}": 1024.0,
                f"downlink_bytes_level{level}": 1024.0}
    if majority is not None:
        rec["test_majority_rate"] = majority
    return rec


ARGS = argparse.Namespace(clients=20, clients_per_round=8, rounds=6, local_steps=8, batch_size=8, rank=8, lr=3e-3,
                          alpha=0.1, seeds=[0, 1])


def test_fedhft_table_has_the_majority_row_beside_the_global_accuracy():
    """Rates 0.178 and 0.144: mean 0.161, sample std |0.178 - 0.144| / sqrt(2) = 0.024, in the global-acc column."""
    text = markdown(summarise([record(0, 0.178), record(1, 0.144)]), [], ARGS)
    assert "| majority class of the test split (reference) | - | - | - | - | 0.161 ± 0.024 | - | - | - |" in text


def test_fedhft_table_of_older_records_has_no_reference_row():
    """Records from before the rate was recorded (``--resume``) produce no invented row."""
    text = markdown(summarise([record(0, None)]), [], ARGS)
    assert "majority class of the test split" not in text
