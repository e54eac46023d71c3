"""GMFL as a wrapper (issue 15 item 3): bit-identity with the pre-wrapper GMFL, and the wrapper's invariants."""

from __future__ import annotations

import json

import pytest

from gmfl_golden import CASES, GOLDEN, fingerprint

RECORDED = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_wrapper_reproduces_the_pre_wrapper_runs_bit_for_bit(name, tmp_path, single_thread):
    """Final global adapter (SHA-256), every round's loss/accuracy, bytes and frozen fractions: as recorded in
    tests/gmfl_pre_wrapper.json on the commit before GMFL became a wrapper."""
    assert fingerprint(CASES[name], str(tmp_path)) == RECORDED[name]
