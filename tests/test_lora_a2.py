"""LoRA-A2's base (fs_gmfl/core/lora_a2, spec GMFL.md section 7.4): the round parity of what trains and uploads, the
aggregation against a hand-written FedAvg, the bytes per round by hand, by the simulator and by ``fs-gmfl comm``,
and a tiny run (GMFL over it: tests/test_lora_a2_gmfl.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fs_gmfl.comm_estimate import estimate
from fs_gmfl.core.adapter import kind_of
from fs_gmfl.core.fedavg.client import LoraClient
from fs_gmfl.core.lora_a2.client import LoraA2Client
from fs_gmfl.core.lora_a2.strategy import LoraA2FedAvg
from fs_gmfl.core.lora_a2.wire import PARITY
from fs_gmfl.core.message import Message, Reply, samples_tensor
from fs_gmfl.core.protocol import TrainStats
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.sim.runner import Simulation

pytestmark = pytest.mark.usefixtures("single_thread")
LORA_A2 = ["federate.method", "lora_a2"]
KEYS = ("m.lora_A.default.weight", "m.lora_B.default.weight", "head.weight")
A, B, HEAD = KEYS


def random_adapter(seed: int) -> dict[str, torch.Tensor]:
    """A LoRA factor pair (r 2, d 3) and a head, random."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {A: (2, 3), B: (3, 2), HEAD: (2, 3)}
    return {k: torch.randn(shapes[k], generator=gen) for k in KEYS}


def uplink(tensors: dict[str, torch.Tensor], keys: list[str], samples: int) -> Message:
    """An uplink of ``keys`` and a sample count."""
    return Message({k: tensors[k] for k in keys}, {"num_samples": samples_tensor(samples)})


def test_rounds_one_to_four_train_and_upload_b_a_b_a_with_the_head(tiny):
    """By hand (spec 7.4, the authors' parity): rounds 1 and 3 train lora_B and the head, rounds 2 and 4 lora_A and
    the head, for every LoRA module of the tiny model; the server expects exactly those keys; the idle factor is not
    in the client's plan and so not in its uplink."""
    sim = Simulation(tiny(*LORA_A2), quiet=True)
    sim.setup()
    strategy, client = sim.method.strategy, sim.method.client
    heads = [k for k in strategy.keys if kind_of(k) == "head"]
    assert len(heads) == 2 and len(strategy.keys) == 8 + 2  # 2 layers x (query, value) x (A, B), head weight and bias
    for rnd, factor in ((1, "lora_B"), (2, "lora_A"), (3, "lora_B"), (4, "lora_A")):
        down = strategy.configure_round(rnd, [0])[0]
        assert int(down.control[PARITY]) == rnd % 2 and sorted(down.tensors) == sorted(strategy.keys)
        expected = sorted([k for k in strategy.keys if f".{factor}." in k] + heads)
        assert len(expected) == 4 + 2 and sorted(strategy.trainable_keys()) == expected
        plan = client.prepare(sim.model, down, {})
        assert sorted(plan.trainable) == expected
        sent = client.finish(plan, TrainStats(num_samples=5, steps=1, mean_loss=0.0), {})
        assert sorted(sent.tensors) == expected and sent.num_samples == 5


def test_a_downlink_without_parity_is_refused():
    """The client needs the round's parity: a downlink without it raises InputError rather than guessing."""
    with pytest.raises(InputError, match=PARITY):
        LoraA2Client(LoraClient("fedit")).prepare(torch.nn.Module(), Message(random_adapter(0)), {})


@pytest.mark.parametrize("rnd", [1, 2])
def test_aggregation_is_fedavg_of_the_trained_factor_and_keeps_the_other(rnd):
    """Independent reference on random tensors: the round's factor and the head become the sample-weighted mean
    sum_k n_k x_k / sum_k n_k of the uploads (weights 3 and 1); the idle factor keeps its global value exactly."""
    initial = random_adapter(0)
    strategy = LoraA2FedAvg(initial)
    strategy.configure_round(rnd, [0, 1])
    trained = [B, HEAD] if rnd == 1 else [A, HEAD]
    idle = A if rnd == 1 else B
    uploads = {0: (random_adapter(1), 3), 1: (random_adapter(2), 1)}
    report = strategy.aggregate(rnd, [Reply(c, uplink(t, trained, n)) for c, (t, n) in uploads.items()])
    assert report.accepted == [0, 1]
    after = strategy.global_adapter()
    for key in trained:
        reference = (3 * uploads[0][0][key] + 1 * uploads[1][0][key]) / 4
        torch.testing.assert_close(after[key], reference, rtol=1e-6, atol=1e-7)
    assert torch.equal(after[idle], initial[idle])


def test_an_uplink_with_the_idle_factor_is_rejected():
    """Round 1 trains lora_B: an uplink that also carries lora_A is rejected and changes nothing."""
    initial = random_adapter(0)
    strategy = LoraA2FedAvg(initial)
    strategy.configure_round(1, [0])
    report = strategy.aggregate(1, [Reply(0, uplink(random_adapter(1), list(KEYS), 2))])
    assert report.accepted == [] and all(torch.equal(v, initial[k]) for k, v in strategy.global_adapter().items())


def test_bytes_per_round_equal_the_hand_arithmetic_and_the_estimate(tiny):
    """By hand for tiny_bert (hidden 16, r 4, float32; 2 layers x query/value = 4 LoRA modules; head 16x2 + 2):
    each factor is 64 numbers, so one round's uplink per client is one factor of the 4 modules (4 x 64 x 4 B =
    1024 B), the head (34 x 4 = 136 B) and the 8-byte sample count: 1168 B, against FedIT's 2048 + 136 + 8 = 2192 B.
    The downlink is FedIT's whole adapter (2048 + 136 B) plus the 1-byte parity: 2185 B. With two clients a round the
    simulator counts 2336 B up and 4370 B down in each of rounds 1-4, and ``fs-gmfl comm`` says the same for odd
    and even rounds (A and B have equal sizes here, so both parities cost the same)."""
    sim = Simulation(tiny(*LORA_A2, "federate.total_round_num", "4"), quiet=True)
    summary = sim.run()
    rounds = summary["per_round"][1:]
    head = sum(v.numel() * v.element_size() for k, v in sim.method.strategy.global_state.items() if "lora_" not in k)
    assert head == 136
    up, down = 2 * (4 * 64 * 4 + head + 8), 2 * (8 * 64 * 4 + head + 1)
    assert [(r["uplink_bytes"], r["downlink_bytes"]) for r in rounds] == [(up, down)] * 4 == [(2336, 4370)] * 4
    est = estimate(sim.cfg)
    for parity in ("odd", "even"):
        assert est["by_parity"][parity]["per_round"]["uplink_bytes"] == up
        assert est["by_parity"][parity]["per_round"]["downlink_bytes"] == down
    assert est["per_round"]["uplink_bytes"] == up
    fedit = estimate(tiny("federate.method", "fedit"))["per_round"]["uplink_bytes"]
    assert fedit == 2 * 2192 and up / fedit == pytest.approx(0.533, abs=1e-3)


def test_a_tiny_run_finishes_with_every_update_accepted(tiny):
    """Four rounds of the tiny configuration: no rejection; lora_B last changed in round 3 and lora_A in round 4."""
    sim = Simulation(tiny(*LORA_A2), quiet=True)
    summary = sim.run()
    assert summary["method"] == "lora_a2" and summary["rejected_updates"]["total"] == 0
    changed = sim.method.strategy.changed_at
    assert all(changed[k] == 3 for k in changed if ".lora_B." in k)
    assert all(changed[k] == 4 for k in changed if ".lora_A." in k)
