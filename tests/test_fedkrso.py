"""FedKRSO client and server: exactness, synchronisation, memory discipline, bytes, robustness, baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from fs_gmfl.comm_estimate import estimate
from fs_gmfl.config.fields import make
from fs_gmfl.core.estimate import MIB
from fs_gmfl.core.fedkrso import FedKRSOClient, FedKRSOConfig, FedKRSOStrategy, exclude_from_weight_decay, wire
from fs_gmfl.core.message import Reply
from fs_gmfl.core.protocol import TrainStats
from fs_gmfl.core.targets import resolve_targets, target_weights
from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.sim.runner import Simulation
from fs_gmfl.hosts.sim.training import train_local


# -- a toy model and a minimal host loop (spec §11, M0: 2-layer MLP, 3 clients, K = 3, r = 2, J = 2, T = 5) ------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def toy_setup(**overrides):
    torch.manual_seed(0)
    model = MLP()
    cfg = make(FedKRSOConfig, prefix="fedkrso.", **{"num_seeds": 3, "rank": 2, "interval": 2, **overrides})
    layers = resolve_targets(model, ["fc1", "fc2"], key="fedkrso.target_modules")
    weights = {k: w.detach() for k, w in target_weights(model, layers).items()}
    return model, cfg, layers, FedKRSOStrategy(cfg, layers, weights, {}, seed=1), FedKRSOClient(cfg, layers, [])


def toy_data(cid: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + cid)
    return torch.randn(n, 6, generator=g), torch.randint(3, (n,), generator=g)


def toy_local(client, model, message, cid, *, steps=5, n=8, layers=()):
    """Run a client like a host does; return its uplink, end weights and interval slots."""
    plan = client.prepare(model, message, {})
    for p in plan.trainable.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(plan.trainable.values()), lr=0.05, weight_decay=0.0)
    plan.on_optimizer(opt)
    x, y = toy_data(cid, n)
    for step in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        plan.after_step(step)
    plan.info["session"].end_interval()
    end = {k: w.detach().clone() for k, w in target_weights(model, layers).items()}
    uplink = client.finish(plan, TrainStats(num_samples=n, steps=steps, mean_loss=0.0), {})
    return uplink, end, list(plan.info["slot_history"])


def test_new_global_equals_fedavg_of_client_end_weights_m0():
    """3 clients using different seeds, weights 4:8:12: W^1 = sum p_n W_n^end within 1e-5 (fp32); model restored."""
    # Prepare
    model, cfg, layers, server, client = toy_setup()
    w0 = {k: w.clone() for k, w in server.weights.items()}
    downs = server.configure_round(1, [0, 1, 2])
    # Execute
    results = {cid: toy_local(client, model, downs[cid], cid, n=4 * (cid + 1), layers=layers) for cid in range(3)}
    report = server.aggregate(1, [Reply(cid, r[0]) for cid, r in results.items()])
    # Assert
    assert report.accepted == [0, 1, 2]
    assert len({tuple(sorted(set(r[2]))) for r in results.values()}) >= 2  # seed usage differs between clients
    assert [len(r[2]) for r in results.values()] == [3, 3, 3]  # T=5, J=2: intervals of 2, 2 and 1 steps
    for name in server.weights:
        expected = sum((4 * (cid + 1) / 24) * results[cid][1][name].double() for cid in range(3))
        assert torch.allclose(server.weights[name].double(), expected, atol=1e-5), name
        assert not torch.allclose(server.weights[name], w0[name])
        assert torch.equal(target_weights(model, layers)[name].detach(), w0[name])  # client returned to W^0


def test_stale_client_replay_reproduces_the_server_bit_for_bit():
    """A client synced at W^0 that missed 3 rounds replays (seeds, Bbar) of rounds 1..3 and equals W^3 exactly."""
    model, cfg, layers, server, client = toy_setup(catchup="replay")
    stale_model = MLP()
    stale_model.load_state_dict(model.state_dict())
    for rnd in range(1, 4):
        downs = server.configure_round(rnd, [0, 1])
        server.aggregate(rnd, [Reply(c, toy_local(client, model, downs[c], c, layers=layers)[0]) for c in (0, 1)])
    down = server.configure_round(4, [2])[2]
    parsed = wire.parse_downlink(down, layers, num_seeds=3, rank=2, head_keys=[])
    assert [e.round for e in parsed.replay] == [1, 2, 3] and parsed.full is None
    fresh = FedKRSOClient(cfg, layers, [])  # a different process: knows nothing but the message and its W^0
    fresh.catch_up(stale_model, target_weights(stale_model, layers), parsed)
    for name, w in target_weights(stale_model, layers).items():
        assert torch.equal(w, server.weights[name]), name
    assert fresh.model_version(stale_model) == 3


@pytest.mark.parametrize("policy", ["auto", "replay", "full"])
def test_catchup_policy_picks_replay_or_full_sync_by_bytes(policy):
    """auto: the cheaper of replay and full weights; replay: always replay; full: full sync once a round was missed.

    Toy sizes (rank 1): a round's entry costs 40 bytes per seed, a full sync 180 bytes, so one round behind
    replays and three rounds behind (two clients a round, 6+ seeds) is a full sync under 'auto'.
    """
    model, cfg, layers, server, client = toy_setup(catchup=policy, rank=1)
    costs = []
    for rnd in range(1, 4):
        downs = server.configure_round(rnd, [0, 3])
        server.aggregate(rnd, [Reply(c, toy_local(client, model, downs[c], c, layers=layers)[0]) for c in (0, 3)])
        costs.append(server.log[-1].nbytes)
    full_cost = server.full_sync_bytes()
    assert full_cost == 180 and costs[-1] <= full_cost < sum(costs)
    down = server.configure_round(4, [0, 1])  # client 0 is one round behind, client 1 three rounds
    is_full = {c: any(layer.name in down[c].tensors for layer in layers) for c in (0, 1)}
    assert is_full == {0: False, 1: policy != "replay"}
    assert len(server.log) == {"replay": 3, "full": 1, "auto": 1}[policy]
    fixed = 8 * 3 + 16  # round seeds, schedule seed, version
    assert down[0].nbytes == fixed + costs[-1]
    assert down[1].nbytes == fixed + (sum(costs) if policy == "replay" else full_cost)


def test_shared_simulator_model_holds_the_global_weights_at_every_client(tiny, tmp_path):
    """Simulator (one model, 2 of 4 clients a round): after prepare the model's W is the server's W, bit for bit."""
    sim = Simulation(tiny("federate.method", "fedkrso", "fedkrso.interval", "2", "federate.total_round_num", "5",
                          "fedkrso.catchup", "replay"), quiet=True)
    sim.setup()
    sim.method.client.spill_dir = str(tmp_path)
    checks, original = [], sim.method.client.prepare

    def spy(model, message, state):
        plan = original(model, message, state)
        weights = target_weights(model, sim.method.client.layers)
        checks.append(all(torch.equal(w, sim.method.strategy.weights[k]) for k, w in weights.items()))
        return plan

    sim.method.client.prepare = spy
    for rnd in range(1, 6):
        sim.run_round(rnd)
    assert len(checks) == 10 and all(checks)
    assert sim.method.strategy.version == 5 and sim.store.clients() == []  # no per-client state in memory or disk
    lora_layers = [m for m in sim.model.modules() if isinstance(m, LoraLayer)]
    assert lora_layers and all(m.disable_adapters for m in lora_layers)  # the host's unused LoRA is switched off
    assert list(tmp_path.iterdir()) == []  # the synced weights spilled during training were cleaned up


def test_exactness_through_the_simulator_training_loop(tiny):
    """tiny_bert, AdamW, dropout, 3 clients of different sizes: W^1 equals the sample-weighted mean of end weights."""
    sim = Simulation(tiny("federate.method", "fedkrso", "fedkrso.interval", "2", "train.local_update_steps", "5",
                          "federate.sample_client_num", "3"), quiet=True)
    sim.setup()
    strategy, client = sim.method.strategy, sim.method.client
    downs = strategy.configure_round(1, [0, 1, 2])
    replies, ends, sizes = [], [], []
    for cid in (0, 1, 2):
        plan = client.prepare(sim.model, downs[cid], {})
        stats = train_local(plan, sim.data.client_data(cid), sim.cfg, rnd=1, client_id=cid)
        plan.info["session"].end_interval()
        ends.append({k: w.detach().clone() for k, w in target_weights(sim.model, client.layers).items()})
        heads = {k: p.detach().clone() for k, p in plan.trainable.items() if not k.startswith("krso.")}
        replies.append(Reply(cid, client.finish(plan, stats, {})))
        sizes.append(stats.num_samples)
        assert heads and all(torch.equal(replies[-1].message.tensors[k], v) for k, v in heads.items())
    strategy.aggregate(1, replies)
    total = sum(sizes)
    for name, w in strategy.weights.items():
        expected = sum(n / total * end[name].double() for n, end in zip(sizes, ends))
        assert torch.allclose(w.double(), expected, atol=1e-5)


class GradShapes:
    """Records the shape of every gradient autograd computes for the loss of each forward pass of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        self.shapes: set[tuple[int, ...]] = set()
        self.handle = model.register_forward_hook(self._on_output)

    def _on_output(self, module, args, output):
        stack, seen = [output.loss.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            node.register_hook(self._record)
            stack.extend(fn for fn, _ in node.next_functions)

    def _record(self, grad_inputs, grad_outputs):
        self.shapes.update(tuple(g.shape) for g in (*grad_inputs, *grad_outputs) if g is not None)


@pytest.mark.parametrize("method", ["fedkrso", "fft"])
def test_no_gradient_of_a_targeted_weight_shape_is_ever_computed(tiny, method):
    """FedKRSO: no autograd gradient has a targeted W's shape, W.grad stays None, optimizer state is B/head-sized.

    FFT is the positive control: the same recorder sees W-shaped gradients.
    """
    sim = Simulation(tiny("federate.method", method, "dataloader.batch_size", "5", "fedkrso.interval", "2",
                          "train.local_update_steps", "5"), quiet=True)
    sim.setup()
    layers = resolve_targets(sim.model, [], key="t")
    w_shapes = {la.shape for la in layers}
    plan = sim.method.client.prepare(sim.model, sim.method.strategy.configure_round(1, [0])[0], {})
    captured = []
    if plan.on_optimizer is not None:
        bind = plan.on_optimizer
        plan.on_optimizer = lambda opt: (captured.append(opt), bind(opt))
    recorder = GradShapes(sim.model)
    stats = train_local(plan, sim.data.client_data(0), sim.cfg, rnd=1, client_id=0)
    recorder.handle.remove()
    assert stats.steps == 5 and recorder.shapes
    if method == "fft":
        assert w_shapes <= recorder.shapes
        return
    assert not (w_shapes & recorder.shapes)
    weights = target_weights(sim.model, layers)
    assert all(w.grad is None and not w.requires_grad for w in weights.values())
    state_shapes = {tuple(t.shape) for s in captured[0].state.values() for t in s.values() if t.dim() > 0}
    allowed = {tuple(p.shape) for p in plan.trainable.values()}
    assert state_shapes and state_shapes <= allowed and not (state_shapes & w_shapes)
    sim.method.client.finish(plan, stats, {})


@pytest.mark.parametrize("policy,expected_step", [("reset", 1), ("reset_moments", 5), ("transform", 5)])
def test_optimizer_state_is_reset_or_carried_at_each_interval(policy, expected_step):
    """T = 5, J = 2: 'reset' restarts Adam for B each interval (1 step in the last); the others keep counting."""
    model, cfg, layers, server, client = toy_setup(state_policy=policy)
    plan = client.prepare(model, server.configure_round(1, [0])[0], {})
    opt = torch.optim.AdamW(list(plan.trainable.values()), lr=0.05)
    plan.on_optimizer(opt)
    x, y = toy_data(0, 8)
    for step in range(5):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        plan.after_step(step)
    steps = {int(opt.state[b]["step"]) for b in plan.trainable.values()}
    assert steps == {expected_step}
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)  # the toy has no head: every group is B
    client.finish(plan, TrainStats(8, 5, 0.0), {})


@pytest.mark.parametrize("policy", ["reset", "reset_moments"])
def test_interval_start_clears_or_zeroes_the_optimizer_state_of_b(policy):
    """J = 2: after the second step the next interval starts; 'reset' empties B's state, 'reset_moments' keeps
    step = 2 with exp_avg = exp_avg_sq = 0."""
    model, cfg, layers, server, client = toy_setup(state_policy=policy)
    plan = client.prepare(model, server.configure_round(1, [0])[0], {})
    opt = torch.optim.AdamW(list(plan.trainable.values()), lr=0.05)
    plan.on_optimizer(opt)
    x, y = toy_data(0, 8)
    for step in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        plan.after_step(step)
    for b in plan.trainable.values():
        state = opt.state[b]
        if policy == "reset":
            assert not state
        else:
            assert int(state["step"]) == 2
            assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    client.finish(plan, TrainStats(8, 2, 0.0), {})


@pytest.mark.parametrize("policy,expected_delta", [
    # step restarts at t = 1: m_hat = g, v_hat = g^2, so the step is lr * g / |g| = 0.1
    ("reset", 0.1),
    # t = 3 with zeroed moments: m_hat = 0.1 / (1 - 0.9^3) = 0.369004, v_hat = 0.001 / (1 - 0.999^3) = 0.333667,
    # step = lr * 0.369004 / sqrt(0.333667) = 0.1 * 0.638815
    ("reset_moments", 0.0638815),
])
def test_adam_step_after_an_interval_reset_matches_hand_computed_bias_correction(policy, expected_delta):
    """Adam on loss = 2p (g = 2): two steps, the interval reset, a third step; its size is hand-computed."""
    from fs_gmfl.core.fedkrso.client import zero_moments
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=0.1, eps=1e-12)
    for _ in range(2):
        (2 * p).sum().backward()
        opt.step()
        opt.zero_grad()
    before = float(p.detach())
    if policy == "reset":
        opt.state[p].clear()
    else:
        zero_moments(opt.state[p])
    (2 * p).sum().backward()
    opt.step()
    assert before - float(p.detach()) == pytest.approx(expected_delta, rel=1e-5)


def test_b_is_exempt_from_decoupled_weight_decay_but_the_head_is_not():
    """exclude_from_weight_decay moves B into a wd = 0 group with the same lr; the head keeps wd."""
    b, head = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([b, head], lr=0.1, weight_decay=0.5)
    exclude_from_weight_decay(opt, [b])
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert groups[id(b)]["weight_decay"] == 0.0 and groups[id(head)]["weight_decay"] == 0.5
    assert groups[id(b)]["lr"] == 0.1
    b.grad, head.grad = torch.zeros(2), torch.zeros(2)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and torch.allclose(head.detach(), torch.full((2,), 0.95))


def test_projected_weight_decay_pulls_the_weights_towards_zero():
    """With zero data gradient ('projected', wd > 0) the only update shrinks ||W|| inside the subspaces."""
    model, cfg, layers, server, _ = toy_setup(subspace_weight_decay="projected")
    client = FedKRSOClient(cfg, layers, [], weight_decay=0.5)
    plan = client.prepare(model, server.configure_round(1, [0])[0], {})
    opt = torch.optim.SGD(list(plan.trainable.values()), lr=0.1)
    plan.on_optimizer(opt)
    before = sum(float(w.pow(2).sum()) for w in server.weights.values())
    for step in range(4):
        (0.0 * model(torch.zeros(1, 6)).sum()).backward()
        opt.step()
        opt.zero_grad()
        plan.after_step(step)
    plan.info["session"].end_interval()
    after = sum(float(w.pow(2).sum()) for w in target_weights(model, layers).values())
    assert after < before
    client.finish(plan, TrainStats(1, 4, 0.0), {})


def test_malformed_upload_is_rejected_and_the_global_state_is_untouched():
    """One bad uplink (NaN accumulator) is rejected with a reason; the good one alone defines the update."""
    model, cfg, layers, server, client = toy_setup()
    ref = FedKRSOStrategy(cfg, layers, server.weights, {}, seed=1)
    downs, ref_downs = server.configure_round(1, [0, 1]), ref.configure_round(1, [1])
    good = toy_local(client, model, downs[1], 1, layers=layers)[0]
    bad = toy_local(client, model, downs[0], 0, layers=layers)[0]
    bad.tensors[wire.acc_key(layers[0].name)].view(-1)[0] = float("nan")
    report = server.aggregate(1, [Reply(0, bad), Reply(1, good)])
    ref.aggregate(1, [Reply(1, good)])
    assert report.accepted == [1] and "non-finite" in report.rejected[0]
    assert all(torch.equal(server.weights[k], ref.weights[k]) for k in ref.weights)
    before = {k: v.clone() for k, v in server.weights.items()}
    report = server.aggregate(2, [Reply(0, bad)])
    assert report.accepted == [] and all(torch.equal(server.weights[k], before[k]) for k in before)
    assert server.version == 2 and server.log[-1].seeds == []


def test_state_dict_round_trip_continues_identically():
    """Save after 2 rounds, load into a fresh server: the third round gives identical downlinks and weights."""
    model, cfg, layers, server, client = toy_setup(catchup="replay")
    for rnd in (1, 2):
        downs = server.configure_round(rnd, [0, 1])
        server.aggregate(rnd, [Reply(c, toy_local(client, model, downs[c], c, layers=layers)[0]) for c in (0, 1)])
    restored = FedKRSOStrategy(cfg, layers, {k: torch.zeros_like(v) for k, v in server.weights.items()}, {}, seed=1)
    restored.load_state_dict(server.state_dict())
    a, b = server.configure_round(3, [2]), restored.configure_round(3, [2])
    assert a[2].control.keys() == b[2].control.keys()
    assert all(torch.equal(a[2].tensors[k], b[2].tensors[k]) for k in a[2].tensors)
    up = toy_local(client, model, a[2], 2, layers=layers)[0]
    server.aggregate(3, [Reply(2, up)])
    restored.aggregate(3, [Reply(2, up)])
    assert all(torch.equal(server.weights[k], restored.weights[k]) for k in server.weights)


def test_simulated_uplink_bytes_follow_the_formula_and_runs_are_deterministic(tiny):
    """Per round: uplink = sum_n (4 r R |U_n| + 4 |Phi| + |U_n| + 8); same seed same weights, other seed differs."""
    args = ("federate.method", "fedkrso", "fedkrso.interval", "2")
    sims = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        sim = Simulation(tiny(*args, "expname", name, "seed", seed), quiet=True)
        summary = sim.run()
        sims.append(sim)
        per_seed = 4 * 4 * 224 + 1  # r = 4, R = 2 layers x (4 x 16 + 32 + 16) = 224 rows, plus a slot byte
        for row in summary["per_round"][1:]:
            used = row["mean_client_seeds"] * 2  # two clients a round
            assert row["uplink_bytes"] == used * per_seed + 2 * (4 * 34 + 8)
    a, b, c = (s.method.strategy.weights for s in sims)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_all_slots_mode_sends_fixed_shape_uplinks(tiny):
    """send_all_slots: every uplink is 4 r R K + 4 |Phi| + 8 bytes whatever the seeds used."""
    sim = Simulation(tiny("federate.method", "fedkrso", "fedkrso.send_all_slots", "True", "fedkrso.num_seeds", "5"),
                     quiet=True)
    summary = sim.run()
    per_client = 4 * 4 * 224 * 5 + 4 * 34 + 8
    assert all(row["uplink_bytes"] == 2 * per_client for row in summary["per_round"][1:])


@pytest.mark.parametrize("overrides,key", [
    (("fedkrso.num_seeds", "0"), "fedkrso.num_seeds"),
    (("fedkrso.num_seeds", "20", "fedkrso.seed_bits", "4"), "fedkrso.seed_bits"),
    (("fedkrso.state_policy", "keep"), "fedkrso.state_policy"),
    (("fedkrso.subspace_weight_decay", "full"), "fedkrso.subspace_weight_decay"),
    (("fedkrso.catchup", "sometimes"), "fedkrso.catchup"),
    (("fedkrso.basis", "hadamard"), "fedkrso.basis"),
])
def test_bad_fedkrso_values_are_config_errors(tiny, overrides, key):
    """Each bad value raises a ConfigError naming its key."""
    with pytest.raises(ConfigError) as err:
        tiny("federate.method", "fedkrso", *overrides)
    assert err.value.key == key


@pytest.mark.parametrize("method,key", [("fedkrso", "fedkrso.target_modules"), ("fft", "fft.target_modules")])
def test_missing_target_module_fails_at_setup(tiny, method, key):
    """A target that does not exist in the backbone stops the run at set-up with a ConfigError on the method's key."""
    with pytest.raises(ConfigError, match="'c_attn' matches none") as err:
        Simulation(tiny("federate.method", method, f"{method}.target_modules", "[query, c_attn]"), quiet=True).setup()
    assert err.value.key == key


def test_comm_estimate_reproduces_the_spec_table_for_roberta_base(tiny):
    """roberta-base, author targets, r = 4, K = 10, I = 10 (meta device): 3.52 / 10.50 / 14.92 MiB; LoRA 4.79 MiB."""
    cfg = tiny("model.type", "roberta-base", "federate.method", "fedkrso", "train.local_update_steps", "100",
               "federate.client_num", "10", "federate.sample_client_num", "10")
    result = estimate(cfg)
    assert result["fedkrso"]["rows_R"] == 82944 and result["adapter"]["head_params"] == 592130
    up = result["uplink_bytes"]
    assert up["one_seed"] == 4 * 4 * 82944 + 4 * 592130 + 1 + 8
    assert round(up["one_seed"] / MIB, 2) == 3.52 and round(up["expected"] / MIB, 2) == 10.50
    assert up["all_slots"] == 4 * 4 * 82944 * 10 + 4 * 592130 + 8 and round(up["all_slots"] / MIB, 2) == 14.92
    assert round(result["baselines_uplink_bytes"]["fedit_lora_same_rank_and_targets"] / MIB, 2) == 4.79
    assert result["downlink_bytes"]["full_sync"] == 4 * 84934656 + 4 * 592130 + 8 * 10 + 16
    fft = estimate(tiny("model.type", "roberta-base", "federate.method", "fft"))
    assert fft["profiles"]["default"]["uplink"]["bytes"] == 4 * (84934656 + 592130) + 8


def test_fft_baseline_trains_targeted_weights_and_averages_them(tiny):
    """FFT: W and head move, other backbone weights do not; bytes are the full tensors each way."""
    sim = Simulation(tiny("federate.method", "fft"), quiet=True)
    summary = sim.run()
    trained = 4096 + 34
    assert summary["comm"]["uplink_bytes"] == 4 * 2 * (4 * trained + 8)
    assert summary["comm"]["downlink_bytes"] == 4 * 2 * 4 * trained
    fresh = Simulation(tiny("federate.method", "fft", "expname", "fresh"), quiet=True)
    fresh.setup()
    final, initial = sim.method.strategy.global_adapter(), fresh.method.strategy.global_adapter()
    assert all(not torch.equal(final[k], initial[k]) for k in final)
    frozen = [n for n, _ in fresh.model.named_parameters() if "embeddings" in n or "LayerNorm" in n]
    params = dict(sim.model.named_parameters())
    assert frozen and all(torch.equal(params[n], dict(fresh.model.named_parameters())[n]) for n in frozen)


def test_benchmark_summary_and_table_from_run_rows():
    """The benchmark's summary averages over seeds and its table prints accuracy, bytes, memory and step time."""
    from fs_gmfl.bench.fedkrso import markdown_table, summarise

    runs = [{"method": "fedkrso", "split": "iid", "seed": s, "final_test_acc": a, "best_test_acc": a + 0.01,
             "test_acc_at_best_val": None, "uplink_bytes_per_client": MIB, "downlink_bytes_per_client": 2 * MIB,
             "uplink_bytes_per_round": 5 * MIB, "downlink_bytes_per_round": 10 * MIB,
             "test_majority_rate": m} for s, a, m in ((0, 0.7, 0.5), (1, 0.8, 0.6))]
    probes = [{"method": "fedkrso", "median_step_seconds": t, "tensor_peak_training_mib": 100.0 + t,
               "rss_before_training_mib": 500.0, "model_mib": 87.0, "trainable_params": 83714,
               "rss_training_overhead_mib": 50.0, "rss_peak_mib": 550.0} for t in (0.2, 0.4, 0.3)]
    summary = summarise(runs, probes, ["fedkrso"], ["iid"])
    assert summary["accuracy"]["fedkrso/iid"]["final_test_acc"][0] == pytest.approx(0.75)
    assert summary["client"]["fedkrso"]["median_step_seconds"] == pytest.approx(0.3)
    table = markdown_table(summary, ["fedkrso"], ["iid"])
    assert "| fedkrso | iid | 0.7500 ± 0.0707 | n/a | 0.7600 ± 0.0707 | 1.000 MiB | 2.000 MiB |" in table
    assert "| fedkrso | 83,714 | 0.300 | 100.3 | 50.0 | 500 |" in table
    # reference row: majority rates 0.5 and 0.6 -> mean 0.55, sample std 0.0707
    assert "| majority class of the test split (reference) | iid | 0.5500 ± 0.0707 | - | - | - | - |" in table


def test_benchmark_targets_option_reaches_every_method_and_matches_at_a_dot(tiny, tmp_path):
    """``bench fedkrso --targets`` sets the three methods' targets (``attention.output.dense`` leaves the FFN output
    out); ``--basis`` sets ``fedkrso.basis``."""
    from fs_gmfl.bench.fedkrso import parse_args, run_overrides
    from fs_gmfl.core.adapter import HEAD, kind_of

    args = parse_args(["--targets", "query, attention.output.dense,query", "--basis", "orthogonal",
                       "--out", str(tmp_path / "b")])
    assert args.targets == ["query", "attention.output.dense"]
    pairs = run_overrides(args, "fft", "iid", 0)
    given = dict(zip(pairs[::2], pairs[1::2]))
    assert given["fedkrso.target_modules"] == given["fft.target_modules"] == "[query, attention.output.dense]"
    assert "target_modules: [query, attention.output.dense]}" in given["llm.adapter.args"]
    assert given["fedkrso.basis"] == "orthogonal"

    sim = Simulation(tiny("federate.method", "fft", "fft.target_modules", given["fft.target_modules"]), quiet=True)
    sim.setup()
    trained = sorted(k for k in sim.method.strategy.global_adapter() if kind_of(k) != HEAD)
    blocks = {k.split(".attention")[0] for k in trained}
    assert len(trained) == 2 * len(blocks) and blocks
    assert all(".attention.self.query." in k or ".attention.output.dense." in k for k in trained), trained
    default = parse_args(["--out", str(tmp_path / "b")])
    assert default.targets == ["query", "key", "value", "intermediate.dense", "output.dense"]


def test_identity_basis_below_full_rank_fails_at_setup_naming_the_key_and_the_layer(tiny):
    """``fedkrso.basis: identity`` with r < d_in stops the run at set-up: a ConfigError naming the key and a layer."""
    with pytest.raises(ConfigError, match=r"'identity' needs min\(fedkrso.rank, d_out\) >= d_in .*d_in 16") as err:
        Simulation(tiny("federate.method", "fedkrso", "fedkrso.basis", "identity", "fedkrso.rank", "4"),
                   quiet=True).setup()
    assert err.value.key == "fedkrso.basis" and err.value.value == "identity"


@pytest.mark.parametrize("basis", ["identity", "orthogonal"])
def test_full_rank_fedkrso_in_the_identity_basis_is_federated_full_fine_tuning(tiny, basis):
    """P = I and one interval per round make FedKRSO's global weights FFT's (Adam on B = Adam on W; no decay);
    a rotated basis (orthogonal P, same rank) gives other weights: Adam is not rotation-invariant."""
    common = ("fedkrso.target_modules", "[query, value]", "fft.target_modules", "[query, value]",
              "fedkrso.rank", "16", "fedkrso.interval", "3", "fedkrso.num_seeds", "2",
              "train.optimizer.type", "AdamW", "train.optimizer.lr", "0.01", "train.optimizer.weight_decay", "0",
              "federate.total_round_num", "2")
    fft = Simulation(tiny("federate.method", "fft", "expname", "fft", *common), quiet=True)
    fft.run()
    krso = Simulation(tiny("federate.method", "fedkrso", "fedkrso.basis", basis, "expname", "krso", *common),
                      quiet=True)
    krso.run()
    fft_weights = fft.method.strategy.global_adapter()
    initial = Simulation(tiny("federate.method", "fft", "expname", "w0", *common), quiet=True)
    initial.setup()
    w0 = initial.method.strategy.global_adapter()
    assert set(krso.method.strategy.weights) == {k for k in fft_weights if "classifier" not in k}
    for name, w in krso.method.strategy.weights.items():
        moved = float((fft_weights[name] - w0[name]).abs().max())
        gap = float((w - fft_weights[name]).abs().max())
        assert moved > 1e-3, name
        if basis == "identity":
            assert gap < 1e-5 * max(1.0, moved) + 2e-6, (name, gap, moved)
        else:
            assert gap > 0.05 * moved, (name, gap, moved)
