"""HAFL on the embedded simulator (tiny random BERT) and its byte figures on GPT-2-Large shapes (meta device)."""

from __future__ import annotations

import json

import pytest
import torch

from fs_gmfl.cli import main
from fs_gmfl.comm_estimate import estimate_context
from fs_gmfl.config import load_config
from fs_gmfl.core.adapter import adapter_parameters, adapter_state, load_adapter_tensors, lora_pairs
from fs_gmfl.core.estimate import MIB
from fs_gmfl.core.hafl import HAFLClient, HAFLStrategy, truncated_factors
from fs_gmfl.core.hafl.wire import INDICES
from fs_gmfl.core.message import Reply
from fs_gmfl.core.registry import spec_of
from fs_gmfl.hosts.common.corpus import HashTokenizer
from fs_gmfl.hosts.common.data import build_federated_data
from fs_gmfl.hosts.common.models import AdapterVariants, build_backbone
from fs_gmfl.hosts.sim.runner import Simulation
from fs_gmfl.hosts.sim.training import train_local
from fs_gmfl.methods import MethodContext, build_method

pytestmark = pytest.mark.usefixtures("single_thread")

# tiny_bert (conftest): hidden 16, 2 layers, LoRA r=4 on query,value -> 4 modules; one rank-1 component of one
# module is 16 (a_i) + 16 (b_i) = 32 floats = 128 bytes.
MODULES, COMPONENT_BYTES = 4, 128
TRUNCATION = ["federate.method", "hafl", "hafl.scheme", "truncation",
              "hafl.profiles", "[{share: 0.5, rank: 1}, {share: 0.25, rank: 2}, {share: 0.25, rank: 4}]"]
FREEZING = ["federate.method", "hafl", "hafl.scheme", "freezing",
            "hafl.profiles", "[{share: 0.5, freeze_ratio: 0.75}, {share: 0.5, freeze_ratio: 0}]"]


def run(cfg):
    sim = Simulation(cfg, quiet=True)
    return sim, sim.run()


def local_setup(cfg):
    """A tiny backbone, its HAFL method (with the simulator's adapter variants) and client 0's data."""
    backbone = build_backbone(cfg, 2)
    variants = AdapterVariants(backbone.model, cfg, backbone.target_modules)
    method = build_method(MethodContext(cfg, adapter_state(backbone.model), variants))
    data = build_federated_data(cfg.data, num_clients=4, tokenizer=HashTokenizer(200), max_length=16, seed=0,
                                vocab_size=200)
    return backbone.model, method, variants, data.client_data(0)


@pytest.mark.parametrize("optimizer", ["AdamW", "Adam"])
def test_frozen_components_are_bit_identical_after_training_with_weight_decay(tiny, optimizer):
    """IFALoRA: with weight decay 0.5, frozen rows of A / columns of B keep every bit; trained ones move and are sent."""
    # Prepare
    cfg = tiny(*FREEZING, "hafl.profiles", "[{share: 1.0, freeze_ratio: 0.5}]", "train.optimizer.type", optimizer,
               "train.optimizer.weight_decay", "0.5", "train.local_update_steps", "5")
    model, method, _, data = local_setup(cfg)
    down = method.strategy.configure_round(1, [0])[0]
    before = {k: v.clone() for k, v in down.tensors.items()}
    # Execute
    plan = method.client.prepare(model, down, {})
    stats = train_local(plan, data, cfg, rnd=1, client_id=0)
    uplink = method.client.finish(plan, stats, {})
    # Assert
    params = adapter_parameters(model)
    assert stats.steps == 5
    for pair in lora_pairs(params):
        a, b = params[pair.a_key].detach(), params[pair.b_key].detach()
        assert torch.equal(a[2:], before[pair.a_key][2:]) and torch.equal(b[:, 2:], before[pair.b_key][:, 2:])
        assert not torch.equal(a[:2], before[pair.a_key][:2]) and not torch.equal(b[:, :2], before[pair.b_key][:, :2])
        assert torch.equal(uplink.tensors[pair.a_key], a[:2]) and torch.equal(uplink.tensors[pair.b_key], b[:, :2])
    assert uplink.control[INDICES].tolist() == [[0, 1]] * MODULES
    assert method.strategy.aggregate(1, [Reply(0, uplink)]).accepted == [0]


@pytest.mark.parametrize("scaling,b_scale", [("global_constant", 1.0), ("peft_per_rank", 2.0)])
def test_truncated_client_trains_a_real_rank_r_model(tiny, scaling, b_scale):
    """ITALoRA: a rank-2 client trains 2-row A / 2-column B tensors, and before training its model computes
    exactly the global model truncated to its components (times r_max/r_k under peft_per_rank scaling)."""
    # Prepare
    cfg = tiny(*TRUNCATION, "hafl.profiles", "[{share: 1.0, rank: 2}]", "hafl.scaling", scaling)
    model, method, variants, data = local_setup(cfg)
    g = torch.Generator().manual_seed(5)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=g) if ".lora_" in k else v
             for k, v in method.strategy.global_state.items()}
    method.strategy.global_state = state
    down = method.strategy.configure_round(1, [0])[0]
    batch = data.batch(torch.arange(8))
    truncated = dict(state)
    for pair in lora_pairs(state):
        truncated[pair.a_key], truncated[pair.b_key] = truncated_factors(state[pair.a_key], state[pair.b_key],
                                                                         torch.tensor([0, 1]), b_scale=b_scale)
    # Execute
    plan = method.client.prepare(model, down, {})
    model.eval()
    with torch.no_grad():
        local_logits = plan.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert plan.model.active_adapter != "default"
    stats = train_local(plan, data, cfg, rnd=1, client_id=0)
    uplink = method.client.finish(plan, stats, {})
    # Assert
    assert all(p.shape[0] == 2 or p.shape[1] == 2 for p in plan.trainable.values())
    assert sum(p.numel() for p in plan.trainable.values()) == MODULES * 2 * 32
    assert model.active_adapter == "default" and len(variants.names) == 1
    with torch.no_grad():
        load_adapter_tensors(model, truncated)
        model.eval()
        global_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(local_logits, global_logits, rtol=1e-5, atol=1e-6)
    assert uplink.payload_bytes == MODULES * 2 * COMPONENT_BYTES


def test_run_bytes_profiles_and_truncated_evaluation(tiny):
    """Each round's uplink is sum over sampled clients of n_k components per module plus indices and counts;
    profiles are reported; truncated evaluations appear; one adapter variant per distinct rank below r_max."""
    sim, summary = run(tiny(*TRUNCATION, "hafl.eval_truncated_ranks", "True", "federate.client_num", "8",
                            "federate.sample_client_num", "3", "federate.total_round_num", "2"))
    profiles = summary["method_info"]["profiles"]
    assert [(p["name"], p["clients"]) for p in profiles] == [("r1", 4), ("r2", 2), ("r4", 2)]
    n_of = {c: p["trained_components"] for p in profiles for c in p["client_ids"]}
    for row in summary["per_round"][1:]:
        n = [n_of[c] for c in row["clients"]]
        assert row["uplink_payload_bytes"] == sum(n) * MODULES * COMPONENT_BYTES
        assert row["uplink_control_bytes"] == sum(MODULES * k * 2 + 8 for k in n)
        assert row["downlink_payload_bytes"] == sum(n) * MODULES * COMPONENT_BYTES
        assert row["downlink_control_bytes"] == len(n) * MODULES * 4 * 4  # scores only
    final_row = summary["per_round"][-1]
    assert {"rank_1/test_acc", "rank_2/test_acc", "test_acc"} <= set(final_row)
    assert len(sim.method.client.model_provider.names) == 2  # ranks 1 and 2; rank 4 is the default adapter
    assert summary["method"] == "hafl-truncation-adaptive" and summary["rejected_updates"]["total"] == 0


def test_freezing_run_zero_padding_erases_untrained_components(tiny):
    """IFZLoRA with only rho=0.75 clients (n_k = 1): components 1-3 are zeroed by zero-padding after round 1,
    while adaptive aggregation keeps them."""
    only_weak = ["hafl.profiles", "[{share: 1.0, freeze_ratio: 0.75}]", "federate.total_round_num", "1"]
    zp_sim, _ = run(tiny(*FREEZING, *only_weak, "hafl.aggregation", "zero_padding", "expname", "zp"))
    ad_sim, _ = run(tiny(*FREEZING, *only_weak, "expname", "ad"))
    zp, ad = zp_sim.method.strategy, ad_sim.method.strategy
    backbone_init = build_backbone(zp_sim.cfg, 2)
    init = adapter_state(backbone_init.model)
    for pair in zp.pairs:
        assert torch.equal(zp.global_state[pair.a_key][1:], torch.zeros(3, 16))
        assert torch.equal(ad.global_state[pair.a_key][1:], init[pair.a_key][1:])
        assert not torch.equal(ad.global_state[pair.a_key][0], init[pair.a_key][0])


def test_clients_training_nothing_upload_only_indices_and_counts(tiny):
    """n_min 0 and rho 1: such clients train nothing, upload 8 bytes of sample count and empty index lists."""
    sim, summary = run(tiny(*FREEZING, "hafl.profiles", "[{clients: [0, 1, 2, 3], freeze_ratio: 1.0}]",
                            "hafl.n_min", "0", "federate.total_round_num", "1"))
    assert summary["method_info"]["profiles"][0]["trained_components"] == 0
    assert summary["comm"]["uplink_bytes"] == 2 * 8 and summary["rejected_updates"]["total"] == 0
    initial = adapter_state(build_backbone(sim.cfg, 2).model)
    assert all(torch.equal(v, initial[k]) for k, v in sim.method.strategy.global_adapter().items())


def test_homlora_through_hafl_equals_fedit(tiny):
    """Every client at full rank + fedavg + train_head is FedIT: same global adapter after 2 rounds."""
    short = ["federate.total_round_num", "2"]
    hom_sim, hom = run(tiny("federate.method", "hafl", "hafl.aggregation", "fedavg", "hafl.train_head", "True",
                            "expname", "hom", *short))
    fed_sim, fed = run(tiny("expname", "fedit", *short))
    a, b = hom_sim.method.strategy.global_adapter(), fed_sim.method.strategy.global_adapter()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert hom["comm"]["uplink_payload_bytes"] == fed["comm"]["uplink_payload_bytes"]


@pytest.fixture(scope="module")
def gpt2_large_initial():
    """The GPT-2-Large-shaped adapter (r=16 on c_attn, 20 labels) built once on the meta device."""
    cfg = load_config("yaml_configs/hafl_comm_gpt2_large.yaml")
    backbone = build_backbone(cfg, 20, meta=True)
    return {k: p.detach() for k, p in adapter_parameters(backbone.model).items()}


@pytest.mark.parametrize("overrides,mib", [
    (["hafl.profiles", "[{share: 1.0, rank: 16}]", "hafl.aggregation", "fedavg"], 112.5),
    (["hafl.profiles", "[{share: 1.0, rank: 2}]", "hafl.aggregation", "fedavg", "llm.adapter.args",
      "[{r: 2, lora_alpha: 32, target_modules: [c_attn]}]"], 14.0625),
    (["hafl.scheme", "freezing", "hafl.profiles",
      "[{share: 0.33, freeze_ratio: 0.875}, {share: 0.33, freeze_ratio: 0.75}, {share: 0.34, freeze_ratio: 0}]"],
     54_706_176 / MIB),
])
def test_gpt2_large_uplink_bytes_match_the_paper(gpt2_large_initial, overrides, mib):
    """fs-gmfl comm's estimator: 112.5 / 14.06 / 52.17 MiB of fp32 LoRA uplink per round for 10 clients, no head."""
    cfg = load_config("yaml_configs/hafl_comm_gpt2_large.yaml", overrides)
    initial = gpt2_large_initial
    if cfg.lora.r != 16:  # the same shapes at a lower rank: the first r rows of A and columns of B
        initial = {k: (v[: cfg.lora.r] if ".lora_A." in k else v[:, : cfg.lora.r] if ".lora_B." in k else v)
                   for k, v in initial.items()}
    result = spec_of("hafl").estimator()(estimate_context(cfg, initial))
    per_round = result["per_round"]
    assert per_round["uplink_lora_mib"] == pytest.approx(mib, rel=1e-12)
    assert per_round["uplink_head_bytes"] == 0
    assert per_round["uplink_control_bytes"] > 0  # indices and sample counts are counted, separately


def test_comm_command_prints_the_paper_mix(capsys):
    """`fs-gmfl comm` on the GPT-2-Large config: 33/33/34 clients of rank 2/4/16 -> 52.17 MiB expected per round."""
    assert main(["comm", "--cfg", "yaml_configs/hafl_comm_gpt2_large.yaml"]) == 0
    out = json.loads(capsys.readouterr().out)
    # 10 x (0.33*2 + 0.33*4 + 0.34*16) x 184,320 params x 4 B = 54,706,176 B
    assert out["per_round"]["uplink_lora_bytes"] == pytest.approx(54_706_176, rel=1e-12)
    assert f"{out['per_round']['uplink_lora_mib']:.2f}" == "52.17"
    assert {k: v["uplink"]["lora_bytes"] for k, v in out["profiles"].items()} == {
        "r2": 2 * 184_320 * 4, "r4": 4 * 184_320 * 4, "r16": 16 * 184_320 * 4}
    assert [v["clients_share"] for v in out["profiles"].values()] == [0.33, 0.33, 0.34]


def test_strategy_type_and_yaml_round_trip(tiny):
    """The registered builder returns the HAFL pair; the resolved config keeps the profiles."""
    cfg = tiny(*FREEZING)
    method = build_method(MethodContext(cfg, adapter_state(build_backbone(cfg, 2).model)))
    assert isinstance(method.strategy, HAFLStrategy) and isinstance(method.client, HAFLClient)
    assert [p.freeze_ratio for p in cfg.hafl.profiles] == [0.75, 0.0]
