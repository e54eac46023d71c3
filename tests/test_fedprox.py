"""FedProx (fs_gmfl/core/fedprox): the proximal step by hand, the loss hook in the simulator's loop, mu = 0 is FedIT,
FedIT's bytes, and the composition with GMFL."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from gmfl_golden import fingerprint
from torch import nn

from fs_gmfl.comm_estimate import estimate
from fs_gmfl.core.fedprox.client import FedProxClient
from fs_gmfl.core.fedprox.ops import proximal_term
from fs_gmfl.core.message import Message
from fs_gmfl.core.protocol import LocalPlan
from fs_gmfl.hosts.common.data import Encoded
from fs_gmfl.hosts.sim.runner import Simulation
from fs_gmfl.hosts.sim.training import train_local

pytestmark = pytest.mark.usefixtures("single_thread")
FEDPROX = ["federate.method", "fedprox", "fedprox.mu", "0.1"]
THREE_ROUNDS = ["federate.total_round_num", "3", "eval.freq", "1"]


class LinearLoss(nn.Module):
    """A model whose batch loss is ``sum(c * w)``: its data gradient is ``c`` whatever the batch."""

    def __init__(self, w: list[float], c: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.c = torch.tensor(c)

    def forward(self, **batch: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=(self.c * self.w).sum())


def one_row() -> Encoded:
    """One training row (the model ignores it)."""
    ids = torch.ones(1, 2, dtype=torch.long)
    return Encoded(ids, ids, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_one_sgd_step_with_the_proximal_term_matches_the_hand_computation(tiny):
    """w = (1, -2, 0.5), w_global = (0.5, 0, 0.5), data gradient c = (0.25, 1, -0.5), mu = 0.5, lr = 0.5:
    gradient c + mu (w - w_global) = (0.5, 0, -0.5), so SGD moves w to (0.75, -2, 0.75), exactly; the reported loss
    is the loss before the step, sum(c w) + mu/2 ||w - w_global||^2 = -2 + 0.25 * (0.25 + 4) = -0.9375."""
    model = LinearLoss([1.0, -2.0, 0.5], [0.25, 1.0, -0.5])
    anchor = {"w": torch.tensor([0.5, 0.0, 0.5])}
    trainable = {"w": model.w}
    plan = LocalPlan(model, trainable, extra_loss=lambda m: proximal_term(trainable, anchor, mu=0.5))
    cfg = tiny("train.optimizer.type", "SGD", "train.optimizer.lr", "0.5", "train.local_update_steps", "1")
    stats = train_local(plan, one_row(), cfg, rnd=1, client_id=0)
    assert torch.equal(model.w.detach(), torch.tensor([0.75, -2.0, 0.75]))
    assert stats.steps == 1 and stats.mean_loss == -0.9375


class PlainBase:
    """Test double of FedIT's client: loads the downlink into two tensors and trains those not frozen."""

    def __init__(self) -> None:
        self.params = {"a": nn.Parameter(torch.zeros(2, 3)), "b": nn.Parameter(torch.zeros(3, 2))}

    def prepare_excluding(self, model, message, client_state, frozen):
        with torch.no_grad():
            for key, p in self.params.items():
                p.copy_(message.tensors[key])
        return LocalPlan(model, {k: p for k, p in self.params.items() if k not in frozen})


def test_the_client_anchors_the_term_at_the_downlink_and_skips_frozen_keys():
    """After prepare, moving a trained tensor by d gives the term's gradient mu * d; a GMFL-frozen key is neither
    trained nor in the term; mu = 0 leaves FedIT's plan without an extra loss."""
    base = PlainBase()
    down = Message({"a": torch.ones(2, 3), "b": torch.zeros(3, 2)})
    plan = FedProxClient(base, mu=0.5).prepare_excluding(nn.Module(), down, {}, frozenset({"b"}))
    assert list(plan.trainable) == ["a"]
    with torch.no_grad():
        base.params["a"].add_(2.0)
    plan.extra_loss(plan.model).backward()
    assert torch.equal(base.params["a"].grad, torch.full((2, 3), 1.0)) and base.params["b"].grad is None
    assert FedProxClient(base, mu=0.0).prepare(nn.Module(), down, {}).extra_loss is None


def test_mu_zero_is_fedit_bit_for_bit(tmp_path):
    """fedprox.mu 0: the same global adapter (SHA-256), losses, accuracies and bytes as FedIT, round by round."""
    fedit = fingerprint(["federate.method", "fedit", *THREE_ROUNDS], str(tmp_path / "fedit"))
    prox = fingerprint(["federate.method", "fedprox", "fedprox.mu", "0", *THREE_ROUNDS], str(tmp_path / "prox"))
    assert prox == fedit


def test_bytes_per_round_are_fedits_and_the_estimate_says_so(tiny):
    """mu 0.1 changes the adapter but not one byte: every round's uplink/downlink bytes (summary) equal FedIT's,
    and so does ``fs-gmfl comm``'s estimate."""
    runs = {}
    for name, overrides in (("fedit", ["federate.method", "fedit"]), ("fedprox", FEDPROX)):
        sim = Simulation(tiny(*overrides, *THREE_ROUNDS, "expname", name), quiet=True)
        runs[name] = (sim.run(), sim.method.strategy.global_adapter(), estimate(sim.cfg))
    (fedit, fedit_adapter, fedit_est), (prox, prox_adapter, prox_est) = runs["fedit"], runs["fedprox"]
    byte_keys = [k for k in fedit["per_round"][1] if k.endswith("_bytes")]
    assert byte_keys and prox["comm"] == fedit["comm"]
    assert [{k: r.get(k) for k in byte_keys} for r in prox["per_round"]] == \
        [{k: r.get(k) for k in byte_keys} for r in fedit["per_round"]]
    assert any(not torch.equal(prox_adapter[k], fedit_adapter[k]) for k in fedit_adapter)
    assert prox["method"] == "fedprox" and prox_est["method"] == "fedprox"
    assert {k: v for k, v in prox_est.items() if k != "method"} == {k: v for k, v in fedit_est.items() if k != "method"}
    assert prox_est["per_round"]["uplink_bytes"] == prox["per_round"][1]["uplink_bytes"]


GMFL_GROWING = ["gmfl.use", "True", "gmfl.period", "1", "gmfl.c", "0.25", "gmfl.beta", "0.25"]


def test_fedprox_under_gmfl_freezes_tensors_from_round_two(tiny):
    """gmfl.use wraps FedProx (spec.gmfl_base): the first mask refresh (after round 1) freezes tensors from round 2
    on, and no update is rejected (the wrapper raises if a frozen tensor were trained or uploaded)."""
    sim = Simulation(tiny(*FEDPROX, *GMFL_GROWING, *THREE_ROUNDS, "expname", "gmfl"), quiet=True)
    summary = sim.run()
    assert summary["method"] == "fedprox+gmfl" and summary["rejected_updates"]["total"] == 0
    assert [r["frozen_fraction"] > 0 for r in summary["per_round"][1:]] == [False, True, True]
