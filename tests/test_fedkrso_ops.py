"""FedKRSO's pure operations, target resolution and wire format, against hand-computed or dense references."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

from fs_gmfl.core.fedkrso import wire
from fs_gmfl.core.fedkrso.ops import (apply_update_, expected_seeds_used, interval_slot_generator, layer_rank, merge_,
                                      next_slot, projected_decay_grad, projection, round_seeds, transform_moment)
from fs_gmfl.core.message import Message, samples_tensor
from fs_gmfl.core.targets import TargetLayer, canonical_key, resolve_targets
from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.common.models import build_backbone
from tests import reference_aggregation as reference
from tests import streamed_aggregation as streamed

KEY = "bert.encoder.layer.0.attention.self.query"
HASH_SNIPPET = ("import hashlib; from fs_gmfl.core.fedkrso.ops import projection; "
                "print(hashlib.sha256(projection(987654321, {key!r}, rank=4, d_in=384).numpy().tobytes()).hexdigest())")


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def layer(name: str = "l.weight", d_out: int = 5, d_in: int = 7, transposed: bool = False) -> TargetLayer:
    return TargetLayer(name, name.removesuffix(".weight"), name.removesuffix(".weight"), d_out, d_in, transposed)


# -- projections ------------------------------------------------------------------------------------------------
def test_projection_hash_agrees_between_processes():
    """Client and server (here: this process and a fresh one) compute bit-identical P for the same (seed, layer)."""
    here = sha(projection(987654321, KEY, rank=4, d_in=384))
    out = subprocess.run([sys.executable, "-c", HASH_SNIPPET.format(key=KEY)], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == here
    assert sha(projection(987654321, KEY, rank=4, d_in=384)) == here  # and again in-process
    assert sha(projection(987654322, KEY, rank=4, d_in=384)) != here
    assert sha(projection(987654321, KEY.replace("query", "key"), rank=4, d_in=384)) != here


def test_projection_has_variance_one_over_r_and_isotropic_gram():
    """Entries ~ N(0, 1/r): sample variance ~ 1/r, and E[P^T P] = I (averaged over many seeds)."""
    p = projection(1, KEY, rank=8, d_in=20000)
    assert abs(float(p.mean())) < 0.005 and abs(float(p.var()) - 1 / 8) < 0.004
    gram = sum(projection(s, KEY, rank=4, d_in=6).t() @ projection(s, KEY, rank=4, d_in=6) for s in range(1, 3001))
    assert torch.allclose(gram / 3000, torch.eye(6), atol=0.08)


def test_orthogonal_projection_has_orthogonal_rows_of_the_gaussian_scale():
    """``basis: orthogonal``: P P^T = (d_in/r) I, entries of variance ~1/r, reproducible per seed, seeds differ."""
    p = projection(3, KEY, rank=16, d_in=384, basis="orthogonal")
    assert p.shape == (16, 384) and p.dtype == torch.float32
    assert torch.allclose(p @ p.t(), (384 / 16) * torch.eye(16), atol=1e-4)
    assert abs(float(p.var()) - 1 / 16) < 0.005
    assert torch.equal(projection(3, KEY, rank=16, d_in=384, basis="orthogonal"), p)
    assert not torch.allclose(projection(4, KEY, rank=16, d_in=384, basis="orthogonal"), p)
    square = projection(3, KEY, rank=12, d_in=12, basis="orthogonal")
    assert torch.allclose(square.t() @ square, torch.eye(12), atol=1e-5)  # r = d_in: a rotation, P^T P = I
    gaussian = projection(3, KEY, rank=12, d_in=12)
    assert float(torch.linalg.cond(gaussian)) > 5.0  # the paper's square P is not a rotation


def test_identity_projection_is_the_identity_and_needs_rank_equal_to_d_in():
    """``basis: identity``: P = I (any seed); a rank below d_in is refused."""
    assert torch.equal(projection(9, KEY, rank=5, d_in=5, basis="identity"), torch.eye(5))
    with pytest.raises(ValueError, match="rank == d_in, got rank 4 and d_in 5"):
        projection(9, KEY, rank=4, d_in=5, basis="identity")


def test_projection_is_drawn_in_float32_then_cast():
    """A float64 projection is the float32 draw cast (every party draws the same fp32 stream)."""
    p32 = projection(5, KEY, rank=3, d_in=11)
    assert torch.equal(projection(5, KEY, rank=3, d_in=11, dtype=torch.float64), p32.double())


def test_layer_rank_is_clamped_to_the_smaller_width():
    """r > min(d_in, d_out) is clamped per layer (spec §9.6)."""
    assert layer_rank(layer(d_out=3, d_in=9), 4) == 3 and layer_rank(layer(d_out=9, d_in=2), 4) == 2
    assert layer_rank(layer(d_out=9, d_in=9), 4) == 4


# -- merges and updates -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("transposed", [False, True])
def test_merge_adds_b_times_p_in_place(transposed):
    """merge_ gives W + B P (or W + (B P)^T for a transposed weight) in the same storage."""
    w, b, p = torch.randn(5, 7), torch.randn(5, 2), torch.randn(2, 7)
    stored = w.t().contiguous() if transposed else w.clone()
    ptr = stored.data_ptr()
    merge_(stored, b, p, transposed=transposed)
    expected = w + b @ p
    assert torch.allclose(stored.t() if transposed else stored, expected, atol=1e-6)
    assert stored.data_ptr() == ptr


def test_apply_update_equals_the_dense_sum_and_the_sequential_merges():
    """W + sum_k Bbar_k P_k (float64 reference, 1e-5) and bit-identical to merging seed by seed (the client path)."""
    la = layer(d_out=6, d_in=9)
    w0, avg, seeds = torch.randn(6, 9), torch.randn(3, 6, 2), [11, 22, 33]
    reference = w0.double() + sum(avg[j].double() @ projection(s, la.key, rank=2, d_in=9).double()
                                  for j, s in enumerate(seeds))
    server = apply_update_(w0.clone(), avg, seeds, layer=la, rank=2)
    client = w0.clone()
    for j, s in enumerate(seeds):
        merge_(client, avg[j], projection(s, la.key, rank=2, d_in=9))
    assert torch.allclose(server.double(), reference, atol=1e-5)
    assert torch.equal(server, client)


def test_apply_update_rejects_a_shape_mismatch():
    """Averaged accumulators must be [seeds, d_out, r]."""
    with pytest.raises(ValueError, match="expected"):
        apply_update_(torch.zeros(6, 9), torch.zeros(2, 6, 2), [1, 2, 3], layer=layer(d_out=6, d_in=9), rank=2)


@pytest.mark.parametrize("average_accumulators", [reference.average_accumulators, streamed.average_accumulators],
                         ids=["reference", "streamed"])
def test_average_accumulators_hand_computed_with_zero_for_non_users(average_accumulators):
    """p = (1/2, 1/4, 1/4); slots {0,2}, {2}, {1}: Bbar_0 = a/2, Bbar_1 = d/4, Bbar_2 = b/2 + c/4."""
    # Prepare
    a, b, c, d = (torch.full((2, 1), v) for v in (4.0, 8.0, 16.0, 12.0))
    uploads = [([0, 2], torch.stack([a, b])), ([2], torch.stack([c])), ([1], torch.stack([d]))]
    before = [u[1].clone() for u in uploads]
    # Execute
    union, avg = average_accumulators(uploads, [0.5, 0.25, 0.25])
    # Assert
    assert union == [0, 1, 2]
    assert torch.equal(avg, torch.stack([torch.full((2, 1), 2.0), torch.full((2, 1), 3.0), torch.full((2, 1), 8.0)]))
    assert all(torch.equal(u[1], x) for u, x in zip(uploads, before))


def test_transform_moment_matches_the_dense_formula():
    """(r/d_in) m P_old P_new^T, computed through an r x r product, equals the dense float64 formula."""
    m, p_old, p_new = torch.randn(5, 3), torch.randn(3, 40), torch.randn(3, 40)
    dense = (3 / 40) * m.double() @ p_old.double() @ p_new.double().t()
    assert torch.allclose(transform_moment(m, p_old, p_new).double(), dense, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_projected_decay_grad_is_the_gradient_of_the_l2_term(transposed):
    """wd (W P^T + B P P^T) equals autograd of (wd/2)||W + B P||^2 with respect to B."""
    w, p = torch.randn(5, 7), torch.randn(2, 7)
    b = torch.randn(5, 2, requires_grad=True)
    (0.5 * 0.3 * (w + b @ p).pow(2).sum()).backward()
    stored = w.t().contiguous() if transposed else w
    got = projected_decay_grad(stored, b.detach(), p, strength=0.3, transposed=transposed)
    assert torch.allclose(got, b.grad, atol=1e-5)


# -- seeds -------------------------------------------------------------------------------------------------------
def test_round_seeds_are_distinct_in_range_and_reproducible():
    """K distinct seeds in [1, 2^bits - 1], a pure function of (master, round); 4 bits, K = 15: all of 1..15."""
    seeds = round_seeds(7, 3, count=10, bits=63)
    assert len(set(seeds)) == 10 and all(1 <= s < 2 ** 63 for s in seeds)
    assert seeds == round_seeds(7, 3, count=10, bits=63) and seeds != round_seeds(7, 4, count=10, bits=63)
    assert sorted(round_seeds(0, 1, count=15, bits=4)) == list(range(1, 16))
    with pytest.raises(ValueError):
        round_seeds(0, 1, count=16, bits=4)


def test_expected_seeds_used_formula_and_simulated_schedules():
    """E|U| = K(1 - (1 - 1/K)^I) = 6.513 for K = I = 10, matching 3000 simulated client schedules."""
    assert expected_seeds_used(10, 10) == pytest.approx(6.5132156)
    assert expected_seeds_used(1, 7) == 1 and expected_seeds_used(10, 1) == pytest.approx(1.0)
    used = []
    for seed in range(3000):
        gen = interval_slot_generator(seed)
        used.append(len({next_slot(gen, 10) for _ in range(10)}))
    assert sum(used) / len(used) == pytest.approx(6.5132, abs=0.05)


# -- targets -----------------------------------------------------------------------------------------------------
def test_default_targets_of_bert_are_every_block_linear_and_never_the_head(tiny):
    """tiny_bert (2 layers): 6 linears per block incl. both output.dense; peft wrappers and the head excluded."""
    model = build_backbone(tiny(), 2).model
    layers = resolve_targets(model, [], key="fedkrso.target_modules")
    assert len(layers) == 12
    first = [la.key for la in layers[:6]]
    assert first == [f"bert.encoder.layer.0.{m}" for m in ("attention.self.query", "attention.self.key",
                                                           "attention.self.value", "attention.output.dense",
                                                           "intermediate.dense", "output.dense")]
    assert layers[0].name.endswith("query.base_layer.weight") and layers[1].name.endswith("key.weight")
    assert (layers[4].d_out, layers[4].d_in) == (32, 16) and not any(la.transposed for la in layers)
    assert canonical_key("base_model.model.x.query.base_layer") == "x.query"


def meta_classifier(arch: str, **shape):
    """A randomly initialised sequence classifier of ``arch`` on the meta device (no weights allocated)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(arch, vocab_size=64, **shape))


def test_default_targets_of_opt_are_every_block_linear():
    """OPT (issue 28): fedkrso.target_modules is inferred, q/k/v/out_proj and fc1/fc2 of every block, not the head."""
    model = meta_classifier("opt", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                            word_embed_proj_dim=16)
    layers = resolve_targets(model, [], key="fedkrso.target_modules")
    assert [la.key for la in layers[:6]] == [f"model.decoder.layers.0.{m}" for m in (
        "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2")]
    assert len(layers) == 12 and not any("score" in la.key for la in layers)


def test_an_architecture_without_default_targets_is_refused_with_its_linear_modules():
    """GPT-J has no default: the error names the key and lists the backbone's linear modules to choose from."""
    model = meta_classifier("gptj", n_embd=16, n_layer=1, n_head=2, rotary_dim=4)
    with pytest.raises(ConfigError) as err:
        resolve_targets(model, [], key="fedkrso.target_modules")
    assert err.value.key == "fedkrso.target_modules"
    assert "no default is known for 'gptj' (known: bert, bloom, distilbert, falcon, gemma" in str(err.value)
    assert str(err.value).endswith("set fedkrso.target_modules to some of this backbone's linear modules: fc_in, "
                                   "fc_out, k_proj, out_proj, q_proj, score, v_proj")


@pytest.mark.parametrize("targets,fragment", [(["nope"], "'nope' matches none"), (["classifier"], "'classifier'")])
def test_unknown_or_head_targets_are_config_errors(tiny, targets, fragment):
    """A target that names no linear layer of the blocks (or names the head) is a ConfigError naming the key."""
    model = build_backbone(tiny(), 2).model
    with pytest.raises(ConfigError, match=fragment) as err:
        resolve_targets(model, targets, key="fedkrso.target_modules")
    assert err.value.key == "fedkrso.target_modules"


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
def test_gpt2_conv1d_layers_are_transposed_targets(tiny):
    """GPT-2's Conv1D weights are stored d_in x d_out; c_attn has d_out = 3 x hidden."""
    model = build_backbone(tiny("model.type", "tiny_gpt2", "model.task", "causal_lm"), 2).model
    layers = resolve_targets(model, [], key="k")
    c_attn = next(la for la in layers if la.key.endswith("attn.c_attn"))
    assert c_attn.transposed and (c_attn.d_out, c_attn.d_in) == (48, 16) and c_attn.shape == (16, 48)


# -- wire format -------------------------------------------------------------------------------------------------
LAYERS = [layer("a.weight", d_out=5, d_in=7), layer("b.weight", d_out=3, d_in=4)]  # R = 8 rows
HEAD = {"head.modules_to_save.weight": torch.zeros(2, 3)}  # 6 parameters


def accumulators(slots):
    return {s: {la.name: torch.full((la.d_out, 2), float(s + 1)) for la in LAYERS} for s in slots}


def test_uplink_bytes_follow_the_formula():
    """Uplink = 4 r R |U| + 4 |Phi| + |U| (uint8 slots) + 8; all slots: 4 r R K + 4 |Phi| + 8, no slot bytes."""
    up = wire.uplink_message(accumulators([1, 4, 6]), LAYERS, rank=2, num_seeds=10, head=HEAD, num_samples=5,
                             all_slots=False)
    assert up.nbytes == 4 * 2 * 8 * 3 + 4 * 6 + 3 + 8
    assert up.control[wire.SLOTS].tolist() == [1, 4, 6] and up.control[wire.SLOTS].dtype == torch.uint8
    full = wire.uplink_message(accumulators([1, 4, 6]), LAYERS, rank=2, num_seeds=10, head=HEAD, num_samples=5,
                               all_slots=True)
    assert full.nbytes == 4 * 2 * 8 * 10 + 4 * 6 + 8 and wire.SLOTS not in full.control
    assert torch.equal(full.tensors[wire.acc_key("a.weight")][4], torch.full((5, 2), 5.0))
    assert torch.equal(full.tensors[wire.acc_key("a.weight")][0], torch.zeros(5, 2))
    assert wire.slot_dtype(300) == torch.int32


def test_downlink_bytes_follow_the_formula_and_parse_back():
    """Replay: 8K + 16 + 4|Phi| + sum_i (8|U_i| + 4 r R |U_i|); full sync: 8K + 16 + 4|Phi| + 4 sum d_out d_in."""
    entries = [wire.LogEntry(3, [101, 102], {la.name: torch.randn(2, la.d_out, 2) for la in LAYERS}),
               wire.LogEntry(4, [], {la.name: torch.zeros(0, la.d_out, 2) for la in LAYERS}),
               wire.LogEntry(5, [103], {la.name: torch.randn(1, la.d_out, 2) for la in LAYERS})]
    down = wire.downlink_message(seeds=range(10), schedule_seed=9, version=5, head=HEAD, replay=entries)
    assert down.nbytes == 8 * 10 + 16 + 4 * 6 + (8 * 3 + 4 * 2 * 8 * 3)
    parsed = wire.parse_downlink(down, LAYERS, num_seeds=10, rank=2, head_keys=list(HEAD))
    assert [e.round for e in parsed.replay] == [3, 4, 5] and [e.seeds for e in parsed.replay] == [[101, 102], [],
                                                                                                   [103]]
    assert torch.equal(parsed.replay[0].tensors["a.weight"], entries[0].tensors["a.weight"])
    assert parsed.full is None and parsed.version == 5 and parsed.schedule_seed == 9
    weights = {la.name: torch.randn(la.d_out, la.d_in) for la in LAYERS}
    full = wire.downlink_message(seeds=range(10), schedule_seed=9, version=5, head=HEAD, full=weights)
    assert full.nbytes == 8 * 10 + 16 + 4 * 6 + 4 * (35 + 12)
    assert torch.equal(wire.parse_downlink(full, LAYERS, num_seeds=10, rank=2, head_keys=list(HEAD)).full["b.weight"],
                       weights["b.weight"])


def good_uplink() -> Message:
    return wire.uplink_message(accumulators([0, 3]), LAYERS, rank=2, num_seeds=4, head=HEAD, num_samples=5,
                               all_slots=False)


@pytest.mark.parametrize("mutate,fragment", [
    (lambda m: m.control.__setitem__(wire.SLOTS, torch.tensor([3, 0], dtype=torch.uint8)), "strictly increasing"),
    (lambda m: m.control.__setitem__(wire.SLOTS, torch.tensor([0, 4], dtype=torch.uint8)), "below 4"),
    (lambda m: m.control.__setitem__(wire.SLOTS, torch.tensor([0, 3], dtype=torch.int64)), "uint8"),
    (lambda m: m.control.pop(wire.SLOTS), "missing"),
    (lambda m: m.control.__setitem__("extra", torch.zeros(1)), "unexpected control"),
    (lambda m: m.control.__setitem__("num_samples", samples_tensor(0)), "not positive"),
    (lambda m: m.tensors.pop(wire.acc_key("b.weight")), "key mismatch"),
    (lambda m: m.tensors.__setitem__(wire.acc_key("a.weight"), torch.zeros(3, 5, 2)), "shape"),
    (lambda m: m.tensors.__setitem__(wire.acc_key("a.weight"), torch.zeros(2, 5, 2, dtype=torch.float64)), "dtype"),
    (lambda m: m.tensors[wire.acc_key("b.weight")].fill_(float("nan")), "non-finite"),
    (lambda m: m.tensors["head.modules_to_save.weight"].fill_(1e9), "magnitude"),
])
def test_malformed_uplinks_are_rejected_with_a_reason(mutate, fragment):
    """Slots (order, range, dtype, presence), keys, shapes, dtypes, values and sample count are all checked."""
    ok = good_uplink()
    assert wire.check_uplink(ok, layers=LAYERS, rank=2, num_seeds=4, all_slots=False, head=HEAD,
                             dtype=torch.float32) == ([0, 3], None)
    mutate(ok)
    slots, reason = wire.check_uplink(ok, layers=LAYERS, rank=2, num_seeds=4, all_slots=False, head=HEAD,
                                      dtype=torch.float32)
    assert slots is None and fragment in reason
