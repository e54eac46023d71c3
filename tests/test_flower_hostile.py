"""Hostile replies on the Flower host: each is rejected and the global model is what it would be without that client.

Client 3's node runs a ClientApp that trains honestly and then corrupts its reply in one way per run (the run's
``expname`` names the corruption): NaN, a wrong shape, a wrong dtype, an unknown tensor, a forged sample count, a
record that is not fs_gmfl's (Flower's numpy serialisation, a truncated buffer, a bool with a byte 2). The reference
is the simulator with ``faults.nan_clients: [3]`` (client 3's uplink rejected every round): the global adapter must
be the same bit for bit, and every round must list exactly one rejected update.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flower_helpers import needs_flower, simulate_many

from fs_gmfl.hosts.sim.runner import Simulation

pytestmark = [needs_flower, pytest.mark.usefixtures("single_thread")]

ATTACKS = ("nan", "inf", "shape", "dtype", "extra_tensor", "samples_huge", "samples_zero", "samples_float",
           "numpy_stype", "short_buffer", "bool_byte", "missing_control")
COMMON = ["federate.total_round_num", "2", "eval.freq", "2", "federate.sample_client_num", "4",
          "flower.fold_order", "client_id", "flower.client_threads", "1"]
HOSTILE = 3


def corrupt(reply, attack: str):
    """Corrupt the reply's records in place (the attack runs after honest training)."""
    from flwr.app import Array

    from fs_gmfl.hosts.flower.records import CONTROL, TENSORS, to_array

    tensors, control = reply.content[TENSORS], reply.content[CONTROL]
    key = next(iter(tensors.keys()))
    first = torch.frombuffer(bytearray(tensors[key].data), dtype=torch.float32).reshape(tensors[key].shape).clone()
    if attack in ("nan", "inf"):
        first.view(-1)[0] = float(attack)
        tensors[key] = to_array(first)
    elif attack == "shape":
        tensors[key] = to_array(torch.cat([first, first[:1]]))
    elif attack == "dtype":
        tensors[key] = to_array(first.double())
    elif attack == "extra_tensor":
        tensors["classifier.injected"] = to_array(torch.ones(3))
    elif attack == "samples_huge":
        control["num_samples"] = to_array(torch.tensor(10**12))
    elif attack == "samples_zero":
        control["num_samples"] = to_array(torch.tensor(0))
    elif attack == "samples_float":
        control["num_samples"] = to_array(torch.tensor(40.0))
    elif attack == "numpy_stype":
        tensors[key] = Array(first.numpy())
    elif attack == "short_buffer":
        array = tensors[key]
        tensors[key] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data[:-4])
    elif attack == "bool_byte":
        tensors["lora.mask"] = Array(dtype="bool", shape=(2,), stype=tensors[key].stype, data=b"\x01\x02")
    elif attack == "missing_control":
        del reply.content[CONTROL]
    else:  # pragma: no cover
        raise ValueError(attack)


def hostile_client_app():
    from flwr.clientapp import ClientApp

    from fs_gmfl.hosts.flower.client import CFG_TEXT, CONFIG, config_from_text, partition_of, query_message, train_message

    app = ClientApp()

    @app.train()
    def train(msg, context):
        reply = train_message(msg, context)
        attack = config_from_text(str(msg.content[CONFIG][CFG_TEXT])).expname
        if partition_of(context) == HOSTILE:
            corrupt(reply, attack)
        return reply

    app.query()(query_message)
    return app


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import tiny_config

    reference = Simulation(tiny_config(tmp_path_factory.mktemp("sim"), *COMMON, "faults.nan_clients", f"[{HOSTILE}]"),
                           quiet=True)
    reference.run()
    configs = [tiny_config(tmp_path_factory.mktemp(attack), *COMMON, "expname", attack) for attack in ATTACKS]
    return reference, dict(zip(ATTACKS, simulate_many(configs, client_app=hostile_client_app())))


@pytest.mark.parametrize("attack", ATTACKS)
def test_hostile_reply_is_rejected_and_changes_nothing(runs, attack):
    reference, outcomes = runs
    outcome = outcomes[attack]
    assert outcome.error is None, repr(outcome.error)
    expected = reference.method.strategy.global_adapter()
    got = outcome.run.method.strategy.global_adapter()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    rounds = [row for row in outcome.summary["per_round"] if row["round"] > 0]
    assert [row["rejected"] for row in rounds] == [1, 1]
    assert [row["replies"] for row in rounds] == [4, 4]
    assert outcome.summary["rejected_updates"]["total"] == 2
    assert all(np.isfinite(v.float().numpy()).all() for v in got.values())
