"""FLoRA (fs_gmfl/core/flora, spec GMFL.md section 7.5): stacking against the weighted sum of products, the merged
model after a round by hand, fresh LoRA modules every round, the bytes by hand, a bit-identical resume with
heterogeneous ranks, and the refusal of ``gmfl.use``."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fs_gmfl.comm_estimate import estimate
from fs_gmfl.core.adapter import LoraPair
from fs_gmfl.core.flora.client import DELTA_CACHE, SYNCED
from fs_gmfl.core.flora.ops import MergedModule, StackFold, add_stacked, fresh_lora_a, stack_lora
from fs_gmfl.core.flora.strategy import round_seed
from fs_gmfl.core.flora.wire import DELTA_PREFIX, RANK, SEED, SINCE, STACK_PREFIX, UPTO
from fs_gmfl.core.message import Message, Reply
from fs_gmfl.core.protocol import TrainStats
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.sim.runner import Simulation, temporarily_loaded

pytestmark = pytest.mark.usefixtures("single_thread")
FLORA = ["federate.method", "flora"]
#: client 0 trains rank 1, client 1 rank 2, clients 2 and 3 rank 4 (r = 4, lora_alpha = 8 in the tiny config).
PROFILES = ["flora.profiles", "[{clients: [0], rank: 1}, {clients: [1], rank: 2}, {clients: [2, 3], rank: 4}]"]
F64 = torch.float64


def random_factors(ranks: list[int], d_out: int, d_in: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One random ``(A_k, B_k)`` per rank, float64."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=gen, dtype=F64), torch.randn(d_out, r, generator=gen, dtype=F64))
            for r in ranks]


def trained_round(sim: Simulation, rnd: int, clients: list[int]) -> list[Reply]:
    """Round ``rnd``'s real replies of ``clients`` (trained by the simulator) after the strategy configured it."""
    downlinks = sim.method.strategy.configure_round(rnd, clients)
    return [Reply(c, sim._fit_client(rnd, c, downlinks[c].detached_copy())) for c in clients]


# -- stacking (spec 7.5) -----------------------------------------------------------------------------------------
def test_the_stacked_product_is_the_weighted_sum_of_the_clients_products():
    """Ranks 1, 3 and 5: B_stack A_stack = sum_k p_k s_k B_k A_k (float64); the server's reply-by-reply stacks are the
    same stacks in float32, and its merge adds their product to the update (rows and columns swapped for a
    transposed weight)."""
    # Prepare
    factors = random_factors([1, 3, 5], d_out=7, d_in=6, seed=0)
    counts, scalings = [3.0, 1.0, 4.0], [2.0, 0.5, 1.0]
    shares = [c / sum(counts) for c in counts]
    expected = sum(p * s * (b @ a) for (a, b), p, s in zip(factors, shares, scalings))
    start = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    module = MergedModule(LoraPair("m", "m.lora_A.weight", "m.lora_B.weight"), "m.base_layer.weight", 7, 6, False)
    transposed = MergedModule(module.pair, module.weight_name, 7, 6, True)
    # Execute
    a_stack, b_stack = stack_lora([a for a, _ in factors], [b for _, b in factors],
                                  [p * s for p, s in zip(shares, scalings)])
    fold = StackFold(["m"])
    for (a, b), n, s in zip(factors, counts, scalings):
        fold.add({"m": (a, b)}, s, n)
    (fold_a, fold_b), = fold.stacks().values()
    # Assert
    assert a_stack.shape == (9, 6) and b_stack.shape == (7, 9)
    torch.testing.assert_close(b_stack @ a_stack, expected, rtol=1e-12, atol=1e-12)
    assert fold_a.dtype == fold_b.dtype == torch.float32
    torch.testing.assert_close(fold_a.double(), a_stack, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fold_b.double(), b_stack, rtol=1e-6, atol=1e-7)
    merged = add_stacked(start, module, fold_a, fold_b)
    torch.testing.assert_close(merged.double(), start.double() + expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(add_stacked(start.T.contiguous(), transposed, fold_a, fold_b), merged.T)


def test_the_merged_model_after_a_round_is_w0_plus_alpha_over_r_times_the_weighted_sum(tiny):
    """By hand, ranks 1, 2 and 4 with the default scaling (every client scales by alpha/r = 2): after round 1 each
    base weight is W0 + (alpha/r) sum_k p_k B_k A_k, the head is FedAvg'd, and each client trained with scaling 2."""
    # Prepare
    sim = Simulation(tiny(*FLORA, *PROFILES), quiet=True)
    sim.setup()
    strategy = sim.method.strategy
    base = {m.weight_name: strategy.base[m.weight_name].clone() for m in strategy.modules}
    scalings = []
    finish = sim.method.client.finish
    sim.method.client.finish = lambda plan, *args: scalings.append(lora_scaling(plan)) or finish(plan, *args)
    # Execute
    replies = trained_round(sim, 1, [0, 1, 2])
    report = strategy.aggregate(1, replies)
    # Assert
    assert report.accepted == [0, 1, 2] and report.metrics["stacked_rank"] == 1 + 2 + 4
    assert scalings == [8 * 1 / 4 / 1, 8 * 2 / 4 / 2, 8 / 4]  # lora_alpha_k / r_k = (alpha r_k / r) / r_k = alpha / r
    counts = [r.message.num_samples for r in replies]
    shares = [n / sum(counts) for n in counts]
    merged = strategy.global_adapter()
    for m in strategy.modules:
        update = sum(p * (r.message.tensors[m.pair.b_key].to(F64) @ r.message.tensors[m.pair.a_key].to(F64))
                     for r, p in zip(replies, shares))
        expected = base[m.weight_name].to(F64) + (8 / 4) * update
        torch.testing.assert_close(merged[m.weight_name].to(F64), expected, rtol=1e-6, atol=1e-7)
        assert not merged[m.pair.a_key].any() and not merged[m.pair.b_key].any()
    for key in strategy.head:
        expected = sum(p * r.message.tensors[key].to(F64) for r, p in zip(replies, shares))
        torch.testing.assert_close(merged[key].to(F64), expected, rtol=1e-6, atol=1e-7)


def lora_scaling(plan) -> float:
    """The LoRA scaling of the adapter a plan trains (peft's ``scaling`` of its first LoRA module)."""
    adapter = plan.info["adapter"]
    layer = next(m for m in plan.model.modules() if isinstance(getattr(m, "scaling", None), dict)
                 and adapter in m.scaling)
    return float(layer.scaling[adapter])


# -- fresh LoRA modules every round ---------------------------------------------------------------------------
def test_each_round_starts_from_fresh_lora_modules_on_the_merged_global_model(tiny):
    """Round 2: every B the client trains starts at 0 and every A is the round's fresh draw (not round 1's), so the
    client's model computes exactly the merged global model; after the client the base weights are W0 again."""
    # Prepare
    sim = Simulation(tiny(*FLORA, *PROFILES), quiet=True)
    sim.setup()
    strategy, client = sim.method.strategy, sim.method.client
    strategy.aggregate(1, trained_round(sim, 1, [1, 2]))
    ids = torch.randint(1, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sim.model.eval()
    with temporarily_loaded(sim.model, strategy.global_adapter()), torch.no_grad():
        global_logits = sim.model(**batch).logits
    # Execute
    down = strategy.configure_round(2, [1])[1]
    plan = client.prepare(sim.model, down.detached_copy(), {})
    with torch.no_grad():
        client_logits = plan.model(**batch).logits
    started = {k: p.detach().clone() for k, p in plan.trainable.items()}
    client.finish(plan, TrainStats(num_samples=4, steps=0, mean_loss=0.0), {})
    # Assert
    assert int(down.control[RANK]) == 2 and int(down.control[SEED]) == round_seed(sim.cfg.seed, 2)
    for m in strategy.modules:
        assert not started[m.pair.b_key].any()
        fresh = fresh_lora_a(round_seed(sim.cfg.seed, 2), m.pair.module, rank=2, d_in=m.d_in, init="default")
        assert torch.equal(started[m.pair.a_key], fresh)
        assert not torch.equal(fresh, fresh_lora_a(round_seed(sim.cfg.seed, 1), m.pair.module, rank=2, d_in=m.d_in,
                                                   init="default"))
    torch.testing.assert_close(client_logits, global_logits, rtol=0, atol=1e-6)
    weights = dict(sim.model.named_parameters())
    assert all(torch.equal(weights[m.weight_name], strategy.base[m.weight_name]) for m in strategy.modules)
    assert sim.model.active_adapter == "default"


def test_a_downlink_with_part_of_the_merged_updates_or_no_rank_is_refused(tiny):
    """All merged updates or none: a downlink missing one is refused, and so is one without its rank."""
    sim = Simulation(tiny(*FLORA), quiet=True)
    sim.setup()
    strategy = sim.method.strategy
    strategy.rounds_merged = 1
    down = strategy.configure_round(2, [0])[0]
    partial = Message({k: v for k, v in list(down.tensors.items())[1:]}, dict(down.control))
    with pytest.raises(InputError, match="all or none"):
        sim.method.client.prepare(sim.model, partial, {})
    with pytest.raises(InputError, match=RANK):
        sim.method.client.prepare(sim.model, Message(down.tensors, {SEED: down.control[SEED]}), {})


def test_an_uplink_of_another_rank_than_the_clients_is_rejected(tiny):
    """Client 1 (rank 2) uploading client 2's rank-4 factors is rejected; the global model is unchanged."""
    sim = Simulation(tiny(*FLORA, *PROFILES), quiet=True)
    sim.setup()
    strategy = sim.method.strategy
    replies = trained_round(sim, 1, [1, 2])
    before = strategy.global_adapter()
    report = strategy.aggregate(1, [Reply(1, replies[1].message)])
    assert report.accepted == [] and "shape" in report.rejected[1]
    assert all(torch.equal(v, strategy.global_adapter()[k]) for k, v in before.items())


# -- bytes ---------------------------------------------------------------------------------------------------
def test_bytes_by_hand_by_the_simulator_and_by_the_estimate(tiny):
    """Tiny BERT (2 layers x query, value: 4 modules of 16 x 16; head 34 fp32 values = 136 B; r = 4):
    downlink 136 + 8 (seed) + 2 (rank) = 146 B in round 1 and 146 + 4 x 16 x 16 x 4 = 4242 B from round 2
    (the dense merged update); uplink of a rank-r_k client 4 x r_k x (16 + 16) x 4 + 136 + 8 B."""
    # Prepare
    sim = Simulation(tiny(*FLORA, *PROFILES, "federate.sample_client_num", "4", "federate.total_round_num", "2"),
                     quiet=True)
    # Execute
    summary = sim.run()
    # Assert
    rounds = summary["per_round"][1:]
    up = {rank: 4 * rank * 32 * 4 + 136 + 8 for rank in (1, 2, 4)}
    assert up == {1: 656, 2: 1168, 4: 2192}
    total_up = up[1] + up[2] + 2 * up[4]
    assert [(r["downlink_bytes"], r["uplink_bytes"]) for r in rounds] == [(4 * 146, total_up), (4 * 4242, total_up)]
    est = estimate(sim.cfg)
    assert {name: p["uplink"]["bytes"] for name, p in est["profiles"].items()} == {"r1": 656, "r2": 1168, "r4": 2192}
    assert est["per_round"]["downlink_bytes"] == 4 * 4242 and est["round_1"]["downlink_bytes"] == 4 * 146
    assert est["per_round"]["uplink_bytes"] == pytest.approx(total_up)
    assert est["one_round_stacked_rank"] == pytest.approx(1 + 2 + 4 + 4) and est["dense_update_bytes"] == 4096


# -- checkpoints ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("downlink", ["dense", "stacked"])
def test_resume_with_heterogeneous_ranks_is_bit_identical(tiny, downlink):
    """2 rounds, stop, resume to 4 == 4 rounds straight: the merged updates, the head, the logged stacks and the
    global model bit for bit, the same per-round bytes (stacked: the clients' own updates come back with the run)."""
    overrides = [*FLORA, *PROFILES, "flora.downlink", downlink, "federate.save_freq", "1"]
    straight = Simulation(tiny(*overrides, "expname", "straight"), quiet=True)
    expected = straight.run()
    Simulation(tiny(*overrides, "expname", "resumed", "federate.total_round_num", "2"), quiet=True).run()
    resumed = Simulation(tiny(*overrides, "expname", "resumed"), quiet=True, resume=True)
    got = resumed.run()
    want, have = straight.method.strategy.state_dict(), resumed.method.strategy.state_dict()
    assert want["rounds_merged"] == have["rounds_merged"] == 4
    for part in ("delta", "head"):
        assert all(torch.equal(want[part][k], have[part][k]) for k in want[part])
    assert want["client_sync"] == have["client_sync"] and want["log"].keys() == have["log"].keys()
    assert all(torch.equal(x, y) for t in want["log"] for w in want["log"][t]
               for x, y in zip(want["log"][t][w], have["log"][t][w]))
    assert any(v.any() for v in have["delta"].values())
    g1, g2 = straight.method.strategy.global_adapter(), resumed.method.strategy.global_adapter()
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert got["comm"] == expected["comm"] and got["final"] == expected["final"]


# -- configuration -------------------------------------------------------------------------------------------
def test_gmfl_over_flora_is_refused_with_the_reason(tmp_path):
    """gmfl.use True with flora is refused in one line: the modules are re-created every round."""
    with pytest.raises(ConfigError, match="re-creates its LoRA modules every round") as err:
        tiny_config(tmp_path, *FLORA, "gmfl.use", "True")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("profiles, key", [
    ("[{share: 1.0, freeze_ratio: 0.5}]", "flora.profiles[0].rank"),
    ("[{share: 1.0, rank: 8}]", "flora.profiles[0].rank"),
    ("[{share: 0.5, rank: 2}, {share: 0.4, rank: 4}]", "flora.profiles[1].share"),
    ("[{clients: [0, 9], rank: 2}]", "flora.profiles[0].clients"),
])
def test_bad_rank_profiles_name_their_key(tmp_path, profiles, key):
    """A profile without a rank, a rank above r, shares not summing to 1 or an unknown client: one line naming it."""
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, *FLORA, "flora.profiles", profiles)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_the_downlink_holds_the_dense_merged_updates_under_their_weight_names(tiny):
    """From round 2 the downlink carries one d_out x d_in float32 update per adapted module, named by its weight."""
    sim = Simulation(tiny(*FLORA), quiet=True)
    sim.setup()
    strategy = sim.method.strategy
    assert not any(k.startswith(DELTA_PREFIX) for k in strategy.configure_round(1, [0])[0].tensors)
    strategy.rounds_merged = 1
    down = strategy.configure_round(2, [0])[0]
    deltas = {k[len(DELTA_PREFIX):]: v for k, v in down.tensors.items() if k.startswith(DELTA_PREFIX)}
    assert sorted(deltas) == sorted(m.weight_name for m in strategy.modules)
    assert all(v.shape == (16, 16) and v.dtype == torch.float32 for v in deltas.values())


# -- flora.downlink: stacked -----------------------------------------------------------------------------------
def test_stacked_downlinks_bring_each_clients_own_update_to_the_servers_bit_for_bit(tiny):
    """Ranks 1 (client 0), 2 (client 1), 4 (clients 2, 3); tiny modules of 16 x 16, so stacks beat the dense update
    (4 x 16 x 16 x 4 = 4096 B) up to a stacked rank of 8. Round 1 [0, 1] merges rank 3 (1536 B of stacks);
    round 2 [1, 2] sends both clients round 1's stacks and merges rank 6 (3072 B), and the log (4608 B > 4096 B)
    drops round 1; round 3 [0, 2] sends client 0 (last seen before round 1) the dense update and client 2 round 2's
    stacks. Every client's own update then equals the server's bit for bit."""
    # Prepare
    sim = Simulation(tiny(*FLORA, *PROFILES, "flora.downlink", "stacked"), quiet=True)
    sim.setup()
    strategy = sim.method.strategy
    control = 8 + 2 + 4 + 4  # seed, rank, since, upto
    # Execute
    strategy.aggregate(1, trained_round(sim, 1, [0, 1]))
    second = strategy.configure_round(2, [1, 2])
    strategy.aggregate(2, [Reply(c, sim._fit_client(2, c, second[c].detached_copy())) for c in (1, 2)])
    third = strategy.configure_round(3, [0, 2])
    for cid in (0, 2):
        sim._fit_client(3, cid, third[cid].detached_copy())
    # Assert
    assert [second[c].nbytes for c in (1, 2)] == [1536 + 136 + control] * 2
    assert sorted({k.split("/")[1] for k in second[1].tensors if k.startswith(STACK_PREFIX)}) == ["1"]
    assert sorted(strategy.log) == [2] and strategy.log_floor == 1
    assert third[0].nbytes == 4096 + 136 + control and any(k.startswith(DELTA_PREFIX) for k in third[0].tensors)
    assert third[2].nbytes == 3072 + 136 + control and int(third[2].control[SINCE]) == 1
    assert int(third[2].control[UPTO]) == 2
    for cid in (0, 2):
        with sim.store.open(cid) as state:
            assert state[SYNCED] == 2
            assert all(torch.equal(state[DELTA_CACHE][w], strategy.delta[w]) for w in strategy.delta)


def test_stacks_after_another_round_than_the_clients_are_refused(tiny):
    """A client whose update holds round 2 refuses stacks that continue round 1 (it cannot catch up from them)."""
    sim = Simulation(tiny(*FLORA, "flora.downlink", "stacked"), quiet=True)
    sim.setup()
    strategy = sim.method.strategy
    strategy.client_sync[0] = 1
    down = strategy.configure_round(3, [0])[0]
    state = {SYNCED: 2, DELTA_CACHE: {w: torch.zeros_like(d) for w, d in strategy.delta.items()}}
    with pytest.raises(InputError, match="adds the rounds after 1 but this client holds round 2"):
        sim.method.client.prepare(sim.model, down, state)
