"""FedEx-LoRA (fs_gmfl/core/fedex_lora, spec GMFL.md section 7.2): the aggregation against a hand-written float64
reference on random tensors (the merged model is the clients' mean merged model), frozen factors add no residual,
the client restores the shared model, GMFL's statistic and its no-freeze identity, bytes by hand / simulator /
``fs-gmfl comm``, resume with GMFL freezing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fs_gmfl.comm_estimate import estimate
from fs_gmfl.config import load_config
from fs_gmfl.core.adapter import kind_of, model_tensor_map
from fs_gmfl.core.fedavg.client import LoraClient
from fs_gmfl.core.fedex_lora.client import FedExLoraClient
from fs_gmfl.core.fedex_lora.ops import ResidualTarget, residual
from fs_gmfl.core.fedex_lora.strategy import RESIDUAL_NORM, FedExLoraStrategy
from fs_gmfl.core.message import Message, Reply, samples_tensor
from fs_gmfl.core.protocol import TrainStats
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.sim.runner import Simulation

pytestmark = pytest.mark.usefixtures("single_thread")
FEDEX = ["federate.method", "fedex_lora"]
A, B, HEAD, W = "m.lora_A.weight", "m.lora_B.weight", "head.modules_to_save.weight", "m.base_layer.weight"
RANK, D_IN, D_OUT, SCALING = 2, 5, 3, 4.0


def random_adapter(seed: int) -> dict[str, torch.Tensor]:
    """One adapted module (r 2, d_in 5, d_out 3) and a head, random."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {A: (RANK, D_IN), B: (D_OUT, RANK), HEAD: (2, D_OUT)}
    return {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}


def strategy_on_random_tensors(*, transposed: bool = False) -> tuple[FedExLoraStrategy, torch.Tensor]:
    """A FedEx-LoRA strategy over :func:`random_adapter` and a random base weight (stored transposed if asked)."""
    w0 = torch.randn((D_IN, D_OUT) if transposed else (D_OUT, D_IN), generator=torch.Generator().manual_seed(99))
    target = ResidualTarget("m", A, B, W, transposed, SCALING)
    return FedExLoraStrategy(random_adapter(0), [target], {W: w0}), w0


def uplink(tensors: dict[str, torch.Tensor], keys: list[str], samples: int) -> Message:
    return Message({k: tensors[k] for k in keys}, {"num_samples": samples_tensor(samples)})


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "fan_in_fan_out"])
def test_merged_model_after_aggregation_is_the_mean_of_the_clients_merged_models(transposed):
    """Three clients (sample counts 5, 1, 1, ignored: uniform mean): the new A, B and head are the plain means
    (float64 by hand), and W0' + (alpha/r) B̄ Ā equals mean_k (W0 + (alpha/r) B_k A_k), all checked in float64."""
    # Prepare
    strategy, w0 = strategy_on_random_tensors(transposed=transposed)
    clients = {c: random_adapter(c + 1) for c in range(3)}
    strategy.configure_round(1, list(clients))
    # Execute
    report = strategy.aggregate(1, [Reply(c, uplink(t, [A, B, HEAD], 5 if c == 0 else 1))
                                    for c, t in clients.items()])
    # Assert
    assert report.accepted == [0, 1, 2]
    new = strategy.global_adapter()
    for key in (A, B, HEAD):
        by_hand = (clients[0][key].double() + clients[1][key].double() + clients[2][key].double()) / 3
        torch.testing.assert_close(new[key].double(), by_hand, rtol=0, atol=1e-6)
    base = w0.double().T if transposed else w0.double()
    clients_merged = sum(base + SCALING * t[B].double() @ t[A].double() for t in clients.values()) / 3
    new_base = new[W].double().T if transposed else new[W].double()
    merged = new_base + SCALING * new[B].double() @ new[A].double()
    torch.testing.assert_close(merged, clients_merged, rtol=0, atol=1e-5)
    assert (new_base - base).abs().max() > 1e-2  # the residual is there (FedIT's merge would miss it)
    assert report.metrics[RESIDUAL_NORM] == pytest.approx(float((new_base - base).norm()), rel=1e-5)


def test_the_residual_vanishes_when_a_factor_is_shared():
    """The algebra of spec 7.2: with A identical on every client, mean_k(B_k A) - mean_k(B_k) A = 0."""
    shared_a = random_adapter(0)[A].double()
    bs = [random_adapter(s)[B].double() for s in (1, 2, 3)]
    mean_product = sum(b @ shared_a for b in bs) / 3
    assert residual(mean_product, sum(bs) / 3, shared_a, scaling=SCALING).abs().max() < 1e-12


def test_a_frozen_factor_adds_no_residual_and_keeps_its_value():
    """GMFL froze lora_A: clients upload B and the head only; A and the base weight stay bit-identical, B and the
    head become the uniform means."""
    strategy, w0 = strategy_on_random_tensors()
    strategy.set_frozen(frozenset({A}))
    clients = {c: random_adapter(c + 1) for c in range(2)}
    strategy.configure_round(1, [0, 1])
    report = strategy.aggregate(1, [Reply(c, uplink(t, [B, HEAD], 3)) for c, t in clients.items()])
    assert report.accepted == [0, 1] and report.metrics[RESIDUAL_NORM] == 0.0
    new = strategy.global_adapter()
    assert torch.equal(new[A], random_adapter(0)[A]) and torch.equal(new[W], w0)
    torch.testing.assert_close(new[B], (clients[0][B] + clients[1][B]) / 2)


def test_gpt2_conv1d_weights_take_the_residual_transposed(tmp_path):
    """A real round on tiny GPT-2 (c_attn is a Conv1D stored d_in x d_out, peft fan_in_fan_out): every target is
    transposed, and the merged global model W' + (alpha/r) B̄ Ā equals the mean of the two clients' merged models."""
    cfg = load_config(None, ["model.type", "tiny_gpt2", "model.hidden_size", "16", "model.vocab_size", "200",
                             "model.task", "causal_lm", "data.type", "synthetic", "data.synthetic_num_samples", "40",
                             "federate.client_num", "2", "federate.sample_client_num", "2", "llm.tok_len", "16",
                             "train.local_update_steps", "2", "train.optimizer.lr", "0.05", *FEDEX,
                             "outdir", str(tmp_path)])
    sim = Simulation(cfg, quiet=True)
    sim.setup()
    strategy, uploads = sim.method.strategy, []
    fold = strategy.fold_reply
    strategy.fold_reply = lambda reply, parsed: uploads.append(reply.message.detached_copy().tensors) or fold(
        reply, parsed)
    before = strategy.global_adapter()
    sim.run_round(1)
    after = strategy.global_adapter()
    assert len(uploads) == 2 and strategy.targets and all(t.transposed for t in strategy.targets)
    for t in strategy.targets:
        clients = sum(before[t.weight].double().T + t.scaling * u[t.b_key].double() @ u[t.a_key].double()
                      for u in uploads) / 2
        merged = after[t.weight].double().T + t.scaling * after[t.b_key].double() @ after[t.a_key].double()
        torch.testing.assert_close(merged, clients, rtol=0, atol=1e-5)
        assert not torch.equal(after[t.weight], before[t.weight])


def test_downlink_carries_the_folded_base_weight_and_an_uplink_of_it_is_rejected():
    """The downlink holds the adapter and W0 + residual; an uplink that also carries the base weight is refused."""
    strategy, w0 = strategy_on_random_tensors()
    down = strategy.configure_round(1, [0])[0]
    assert sorted(down.tensors) == sorted([A, B, HEAD, W]) and torch.equal(down.tensors[W], w0)
    up = uplink({**random_adapter(1), W: w0}, [A, B, HEAD, W], 1)
    assert list(strategy.aggregate(1, [Reply(0, up)]).rejected) == [0]


def test_client_trains_on_the_downlinks_base_weight_and_restores_the_shared_model(tiny):
    """prepare loads W0 + residual into the host's model (absolute, not added), finish puts back what was there;
    the plan and the uplink are FedIT's; a downlink without the base weights is refused."""
    sim = Simulation(tiny(*FEDEX), quiet=True)
    sim.setup()
    down = sim.method.strategy.configure_round(1, [0])[0]
    weights = {k: v + 1.0 for k, v in down.tensors.items() if kind_of(k) == "other"}
    assert len(weights) == 4  # query and value of 2 layers
    params = model_tensor_map(sim.model, weights)
    before = {k: p.detach().clone() for k, p in params.items()}
    client = sim.method.client
    plan = client.prepare(sim.model, Message({**down.tensors, **weights}, down.control), {})
    assert all(torch.equal(params[k], weights[k]) for k in weights)
    assert set(plan.trainable) == {k for k in down.tensors if kind_of(k) != "other"}
    sent = client.finish(plan, TrainStats(num_samples=5, steps=1, mean_loss=0.0), {})
    assert all(torch.equal(params[k], before[k]) for k in weights)
    assert set(sent.tensors) == set(plan.trainable)
    adapter_only = {k: v for k, v in down.tensors.items() if k not in weights}
    with pytest.raises(InputError, match="base weights"):
        FedExLoraClient(LoraClient("fedit")).prepare(sim.model, Message(adapter_only), {})
    assert all(torch.equal(params[k], before[k]) for k in weights)


def test_gmfl_statistic_is_the_change_of_the_global_lora_tensors(tiny):
    """GMFL over FedEx-LoRA (period 1): after round 1 each unit's statistic is sum |new - old| of its global LoRA
    tensor (one tensor per unit, as FedIT); the base weights are not units."""
    sim = Simulation(tiny(*FEDEX, "gmfl.use", "True", "gmfl.period", "1"), quiet=True)
    sim.setup()
    strategy = sim.method.strategy
    old = strategy.global_adapter()
    sim.run_round(1)
    new = strategy.global_adapter()
    units = list(strategy.masking.candidate_keys)
    assert sorted(units) == sorted(k for k in old if kind_of(k) in ("lora_A", "lora_B"))
    for key in units:
        assert strategy.masking.statistic[key] == pytest.approx(float((new[key].double() - old[key].double())
                                                                      .abs().sum()), rel=1e-12)


def test_under_gmfl_a_module_with_a_frozen_factor_keeps_its_base_weight(tiny):
    """GMFL over FedEx-LoRA freezing 2 of the 8 LoRA tensors after round 1 (c 0.25, exact_k, period 1; two lora_A,
    which move least while B starts at 0): in round 2 the base weight of each module with a frozen factor keeps
    every bit; the others take a residual."""
    sim = Simulation(tiny(*FEDEX, "gmfl.use", "True", "gmfl.c", "0.25", "gmfl.tie_policy", "exact_k",
                          "gmfl.period", "1"), quiet=True)
    sim.setup()
    strategy = sim.method.strategy
    sim.run_round(1)
    frozen, before = set(strategy.masking.frozen), strategy.global_adapter()
    sim.run_round(2)
    after = strategy.global_adapter()
    touched = {t.weight for t in strategy.targets if t.a_key in frozen or t.b_key in frozen}
    assert len(frozen) == 2 and len(touched) == 2
    for t in strategy.targets:
        assert torch.equal(after[t.weight], before[t.weight]) == (t.weight in touched), t.module


def global_state_after(tmp_path, name: str, *extra: str) -> tuple[dict[str, torch.Tensor], dict]:
    sim = Simulation(tiny_config(tmp_path, *FEDEX, "expname", name, "federate.total_round_num", "3", *extra),
                     quiet=True)
    summary = sim.run()
    return sim.method.strategy.global_adapter(), summary


def test_gmfl_that_never_freezes_is_bit_identical_to_fedex_lora_alone(tmp_path):
    """gmfl.c = gmfl.beta = 0 (ratio 0, refreshed every round): same global adapter and base weights bit for bit,
    same metrics and uplink bytes as FedEx-LoRA alone (spec section 10, edge case 1)."""
    alone, alone_summary = global_state_after(tmp_path, "alone")
    wrapped, wrapped_summary = global_state_after(tmp_path, "wrapped", "gmfl.use", "True", "gmfl.c", "0",
                                                  "gmfl.beta", "0", "gmfl.period", "1")
    assert alone.keys() == wrapped.keys()
    assert all(torch.equal(alone[k], wrapped[k]) for k in alone)
    assert wrapped_summary["final"] == alone_summary["final"]
    assert wrapped_summary["comm"]["uplink_bytes"] == alone_summary["comm"]["uplink_bytes"]
    assert [r[RESIDUAL_NORM] for r in wrapped_summary["per_round"][1:]] == \
        [r[RESIDUAL_NORM] for r in alone_summary["per_round"][1:]]


def test_bytes_by_hand_by_the_simulator_and_by_the_estimate(tiny):
    """Tiny BERT (hidden 16, r 4, query and value of 2 layers, 2 labels), per client and round:
    uplink = FedIT's 4 x (4x16 + 16x4) x 4 B + (2x16 + 2) x 4 B + 8 = 2192 B; downlink = the adapter (2184 B) plus
    d_out x d_in = 16 x 16 float32 per adapted module: 2184 + 4 x 1024 = 6280 B."""
    cfg = tiny(*FEDEX)
    assert (cfg.model.hidden_size, cfg.lora.r) == (16, 4)
    adapter = 4 * (4 * 16 + 16 * 4) * 4 + (2 * 16 + 2) * 4
    up, down = adapter + 8, adapter + 4 * 16 * 16 * 4
    assert (up, down) == (2192, 6280)
    summary = Simulation(cfg, quiet=True).run()
    clients = cfg.federate.clients_per_round()
    rounds = summary["per_round"][1:]
    assert [(r["uplink_bytes"], r["downlink_bytes"]) for r in rounds] == [(clients * up, clients * down)] * 4
    profile = estimate(cfg)["profiles"]["default"]
    assert (profile["uplink"]["bytes"], profile["downlink"]["bytes"]) == (up, down)
    assert profile["downlink"]["other_bytes"] == 4 * 16 * 16 * 4


def test_resume_with_gmfl_freezing_is_bit_identical(tiny):
    """GMFL over FedEx-LoRA freezing from round 2 (c 0.5, period 1): 2 rounds, stop, resume to 4 equals 4 rounds
    straight, base weights included, bit for bit."""
    overrides = [*FEDEX, "gmfl.use", "True", "gmfl.c", "0.5", "gmfl.period", "1", "federate.save_freq", "1"]
    straight = Simulation(tiny(*overrides, "expname", "straight"), quiet=True)
    want_summary = straight.run()
    Simulation(tiny(*overrides, "expname", "resumed", "federate.total_round_num", "2"), quiet=True).run()
    resumed = Simulation(tiny(*overrides, "expname", "resumed"), quiet=True, resume=True)
    got_summary = resumed.run()
    want, have = straight.method.strategy.global_adapter(), resumed.method.strategy.global_adapter()
    assert want.keys() == have.keys() and any(kind_of(k) == "other" for k in want)
    assert all(torch.equal(want[k], have[k]) for k in want)
    assert got_summary["final"] == want_summary["final"]
    assert want_summary["per_round"][-1]["frozen_fraction"] > 0


def test_sample_weighting_and_stateful_downlinks_are_refused(tiny):
    """Uniform by definition (spec 7.2): federate.client_weight other than the default is refused, and so is
    gmfl.downlink stateful_sync (the client does not cache the adapter)."""
    with pytest.raises(ConfigError, match="client_weight"):
        tiny(*FEDEX, "federate.client_weight", "processed_samples")
    with pytest.raises(ConfigError, match="downlink"):
        tiny(*FEDEX, "gmfl.use", "True", "gmfl.downlink", "stateful_sync")
