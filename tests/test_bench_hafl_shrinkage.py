"""``fs-gmfl bench hafl --shrinkage``: the recorder's shares and norms against a hand-computed zero-padding round."""

from __future__ import annotations

import json

import pytest
import torch

from fs_gmfl.bench.hafl import main
from fs_gmfl.bench.hafl_shrinkage import ShrinkageRecorder
from fs_gmfl.config.fields import make
from fs_gmfl.core.hafl import HAFLConfig, HAFLStrategy, build_uplink
from fs_gmfl.core.message import Reply

pytestmark = pytest.mark.usefixtures("single_thread")

A1, B1 = "m.l0.q.lora_A.weight", "m.l0.q.lora_B.weight"
A2, B2 = "m.l0.v.lora_A.weight", "m.l0.v.lora_B.weight"
R, D_IN, D_OUT = 4, 3, 2


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {A1: torch.randn(R, D_IN, generator=g), B1: torch.ones(D_OUT, R),
            A2: torch.randn(R, D_IN, generator=g), B2: torch.ones(D_OUT, R)}


def upload(s: HAFLStrategy, cid: int, down, shift: float) -> Reply:
    factors = {k: v + shift for k, v in down.tensors.items()}
    return Reply(cid, build_uplink(factors, s.pairs, s.pending[cid], rank=s.rank, num_samples=10, truncated=False))


def one_round(aggregation: str) -> tuple[HAFLStrategy, ShrinkageRecorder]:
    """Clients training 2 and 1 of 4 components (shift +1 each): component 0 by both, 1 by half, 2-3 by none."""
    s = HAFLStrategy(initial(), make(HAFLConfig, "hafl.", scheme="freezing", aggregation=aggregation,
                                     weighting="uniform"), trained=[2, 1], lr=0.1)
    recorder = ShrinkageRecorder(s)
    down = s.configure_round(1, [0, 1])
    s.aggregate(1, [upload(s, 0, down[0], 1.0), upload(s, 1, down[1], 1.0)])
    return s, recorder


def test_zero_padding_round_is_recorded_as_computed_by_hand():
    """The round of :func:`one_round` under zero-padding, recorded."""
    s, recorder = one_round("zero_padding")
    [rec] = recorder.rounds
    assert rec["contributors"] == 2 and rec["components"] == 8
    assert (rec["trained_by_all"], rec["trained_by_some"], rec["trained_by_none"]) == (2, 2, 4)
    assert rec["median_share_some"] == 0.5 and rec["median_share_squared_some"] == 0.25
    # component 1, trained by client 0 only: a -> (a + 1) / 2, b -> (1 + 1) / 2 = 1, so its norm moves by
    # ||a + 1|| / (2 ||a||); the two modules' ratios, median = their mean
    init = initial()
    ratios = [float((init[a][1] + 1).norm() / (2 * init[a][1].norm())) for a in (A1, A2)]
    assert rec["median_ratio_some"] == pytest.approx(sum(ratios) / 2)
    new = s.global_adapter()
    assert torch.equal(new[A1][2:], torch.zeros(2, D_IN))  # nobody trained them: zero-padding zeroes them
    update = [float((new[b].double() @ new[a].double()).norm()) for a, b in ((A1, B1), (A2, B2))]
    assert rec["mean_update_norm"] == pytest.approx(sum(update) / 2)


def test_adaptive_round_keeps_a_half_trained_component_at_its_trainers_average():
    """The same round under adaptive aggregation: component 1 becomes client 0's (a + 1, b + 1 = 2)."""
    _, recorder = one_round("adaptive")
    init = initial()
    ratios = [float(2 * (init[a][1] + 1).norm() / init[a][1].norm()) for a in (A1, A2)]
    assert recorder.rounds[0]["median_ratio_some"] == pytest.approx(sum(ratios) / 2)


TINY = ["model.type", "tiny_bert", "model.hidden_size", "16", "model.vocab_size", "200", "data.type", "synthetic",
        "data.synthetic_num_samples", "200", "data.synthetic_num_classes", "3", "llm.tok_len", "16",
        "federate.client_num", "6", "federate.sample_client_num", "3", "dataloader.batch_size", "8"]


def test_shrinkage_probe_end_to_end_on_a_tiny_model(tmp_path):
    """--shrinkage --quick: IFALoRA and IFZLoRA each record every round; the table has a row per round."""
    sets = [w for i in range(0, len(TINY), 2) for w in ("--set", TINY[i], TINY[i + 1])]
    assert main(["--quick", "--shrinkage", "--out", str(tmp_path), *sets]) == 0
    runs = json.loads((tmp_path / "shrinkage.json").read_text())["runs"]
    assert list(runs) == ["IFALoRA", "IFZLoRA"]
    assert [r["aggregation"] for r in (runs["IFALoRA"][0], runs["IFZLoRA"][0])] == ["adaptive", "zero_padding"]
    for run in (runs["IFALoRA"][0], runs["IFZLoRA"][0]):
        assert [r["round"] for r in run["rounds"]] == [1, 2]
        assert all(r["trained_by_all"] + r["trained_by_some"] + r["trained_by_none"] == r["components"]
                   for r in run["rounds"])
    table = (tmp_path / "shrinkage.md").read_text()
    assert table.count("\n| 1 |") == 1 and table.count("\n| 2 |") == 1
