"""Server-side update validation, per strategy: a malformed or malicious uplink is rejected with a reason and
changes nothing.

For every method the uplinks are real (two tiny clients trained by the simulator); one of them is corrupted.
The round with the corrupted reply must give a global model bit-identical to the round without it, name the
client in ``RoundReport.rejected``, and a round whose only reply is rejected must leave the model as it was.
"""

from __future__ import annotations

import copy
import functools
import tempfile

import pytest
import torch
from method_cases import registered_cases  # noqa: E402

from fs_gmfl.core.fedkrso.wire import SLOTS
from fs_gmfl.core.hafl.wire import INDICES
from fs_gmfl.core.message import NUM_SAMPLES, Message, Reply, pack_bits, unpack_bits
from fs_gmfl.core.validation import DEFAULT_MAX_ABS
from fs_gmfl.hosts.sim.runner import Simulation
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = registered_cases(
    adjust={"fedkrso": ["fedkrso.num_seeds", "3"]},
    variants={"gmfl": ["gmfl.use", "True", "gmfl.c", "0.5", "gmfl.period", "1"]})
GOOD, BAD = 0, 1


@functools.lru_cache(maxsize=None)
def round_of(method: str) -> tuple:
    """A strategy about to aggregate round 1 (clients 0 and 1) and the two real uplinks."""
    cfg = tiny_config(tempfile.mkdtemp(prefix="fs-gmfl-validation-"), *METHODS[method])
    sim = Simulation(cfg, quiet=True)
    sim.setup()
    downlinks = sim.method.strategy.configure_round(1, [GOOD, BAD])
    replies = [Reply(cid, sim._fit_client(1, cid, downlinks[cid].detached_copy())) for cid in (GOOD, BAD)]
    return sim.method.strategy, replies


def edited(message: Message, *, tensors: dict | None = None, control: dict | None = None) -> Message:
    """A copy of ``message`` with some entries replaced (``None`` values remove the entry)."""
    t = {k: v.clone() for k, v in message.tensors.items()}
    c = {k: v.clone() for k, v in message.control.items()}
    for target, changes in ((t, tensors or {}), (c, control or {})):
        for key, value in changes.items():
            if value is None:
                target.pop(key)
            else:
                target[key] = value
    return Message(t, c)


def first_float_key(message: Message) -> str:
    return sorted(k for k, v in message.tensors.items() if v.is_floating_point() and v.numel())[0]


def with_entry(message: Message, value: float) -> Message:
    key = first_float_key(message)
    t = message.tensors[key].clone()
    t.view(-1)[0] = value
    return edited(message, tensors={key: t})


def grown(message: Message) -> Message:
    key = first_float_key(message)
    t = message.tensors[key]
    return edited(message, tensors={key: torch.cat([t, t[:1]])})


def retyped(message: Message) -> Message:
    key = first_float_key(message)
    return edited(message, tensors={key: message.tensors[key].double()})


def dropped_key(message: Message) -> Message:
    return edited(message, tensors={first_float_key(message): None})


def extra_key(message: Message) -> Message:
    return edited(message, tensors={"bogus.lora_A.weight": torch.zeros(2, 2)})


def samples(n: int):
    return lambda message: edited(message, control={NUM_SAMPLES: torch.tensor(n, dtype=torch.int64)})


GENERIC = {
    "nan": lambda m: with_entry(m, float("nan")),
    "inf": lambda m: with_entry(m, float("inf")),
    "absurd_norm": lambda m: with_entry(m, 10 * DEFAULT_MAX_ABS),
    "wrong_shape": grown,
    "wrong_dtype": retyped,
    "missing_tensor": dropped_key,
    "unexpected_tensor": extra_key,
    "zero_samples": samples(0),
    "absurd_samples": samples(2**50),
}


def hafl_index(value_of):
    def corrupt(message: Message) -> Message:
        idx = message.control[INDICES].clone()
        idx[0, 1] = value_of(idx)
        return edited(message, control={INDICES: idx})
    return corrupt


def krso_slots(kind: str):
    def corrupt(message: Message) -> Message:
        slots = message.control[SLOTS]
        if kind == "out_of_range":  # a seed outside the round's K seeds
            bad = slots.clone()
            bad[-1] = 3
            return edited(message, control={SLOTS: bad})
        dup = torch.cat([slots[:1], slots[:1]])  # the same seed twice, with matching accumulator rows
        accs = {k: torch.cat([v[:1], v[:1]]) for k, v in message.tensors.items() if k.startswith("krso.")}
        return edited(message, tensors=accs, control={SLOTS: dup})
    return corrupt


def krso_nan_accumulator(message: Message) -> Message:
    key = sorted(k for k in message.tensors if k.startswith("krso."))[0]
    t = message.tensors[key].clone()
    t.view(-1)[-1] = float("nan")
    return edited(message, tensors={key: t})


def hft_extra_row(message: Message) -> Message:
    key = sorted(k for k in message.control if k.startswith("rows_bits:"))[0]
    flags = unpack_bits(message.control[key], 16)
    flags[int((~flags).nonzero()[0])] = True
    return edited(message, control={key: pack_bits(flags)})


SPECIFIC = {
    "hafl": {"index_out_of_range": hafl_index(lambda idx: 4), "duplicate_index": hafl_index(lambda idx: idx[0, 0])},
    "fedkrso": {"seed_outside_round": krso_slots("out_of_range"), "duplicate_seed": krso_slots("duplicate"),
                "nan_accumulator": krso_nan_accumulator},
    "fedhft": {"row_mask_count": hft_extra_row},
}
#: what each rejection reason must say.
REASON = {"nan": "non-finite", "inf": "non-finite", "absurd_norm": "magnitude", "wrong_shape": "has shape",
          "wrong_dtype": "has dtype", "missing_tensor": "missing", "unexpected_tensor": "unexpected",
          "zero_samples": "not positive", "absurd_samples": "absurd", "index_out_of_range": "outside [0, 4)",
          "duplicate_index": "duplicate", "seed_outside_round": "below 3, got", "duplicate_seed": "got [0, 0]",
          "nan_accumulator": "non-finite", "row_mask_count": "keeps 9 rows, expected 8"}
CASES = [(m, name, fn) for m in METHODS for name, fn in {**GENERIC, **SPECIFIC.get(m, {})}.items()]


def test_every_corruption_applies():
    """The index corruptions find what they edit in real uplinks (so no case passes vacuously)."""
    assert len(CASES) == len(METHODS) * len(GENERIC) + 6
    _, replies = round_of("fedkrso")
    assert replies[BAD].message.control[SLOTS].numel() >= 1


@pytest.mark.parametrize("method,corruption,corrupt", CASES, ids=[f"{m}-{n}" for m, n, _ in CASES])
def test_rejected_payload_changes_nothing(method, corruption, corrupt):
    """With a corrupted reply the global model equals the one without it; alone, it leaves the model unchanged."""
    # Prepare
    strategy, replies = round_of(method)
    bad = Reply(BAD, corrupt(replies[BAD].message))
    clean, mixed, alone = (copy.deepcopy(strategy) for _ in range(3))
    before = strategy.global_adapter()
    # Execute
    clean_report = clean.aggregate(1, [replies[GOOD]])
    mixed_report = mixed.aggregate(1, [replies[GOOD], bad])
    alone_report = alone.aggregate(1, [bad])
    # Assert
    assert clean_report.accepted == [GOOD] and mixed_report.accepted == [GOOD]
    assert list(mixed_report.rejected) == [BAD] and REASON[corruption] in mixed_report.rejected[BAD]
    assert list(alone_report.rejected) == [BAD] and alone_report.accepted == []
    expected, got, untouched = clean.global_adapter(), mixed.global_adapter(), alone.global_adapter()
    assert set(got) == set(expected) == set(untouched) == set(before)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(torch.equal(untouched[k], before[k]) for k in before)


def test_rejections_are_logged_and_counted_in_summary(tiny, caplog):
    """A client that always uploads NaN is rejected every round it replies, with the count in summary.json."""
    cfg = tiny()
    sim = Simulation(cfg, quiet=True)
    setup = sim.setup

    def poisoned_setup() -> None:
        setup()
        finish = sim.method.client.finish
        calls = iter(range(10**6))

        def poisoned(plan, stats, state):
            message = finish(plan, stats, state)
            return with_entry(message, float("nan")) if next(calls) % 2 == 0 else message

        sim.method.client.finish = poisoned

    sim.setup = poisoned_setup
    summary = sim.run()
    rounds = cfg.federate.total_round_num
    assert [r["rejected"] for r in summary["per_round"][1:]] == [1] * rounds  # the first of two clients each round
    assert summary["rejected_updates"]["total"] == rounds
    assert list(summary["rejected_updates"]["by_reason"].values()) == [rounds]
    assert sum("rejected" in rec.getMessage() for rec in caplog.records) == rounds
