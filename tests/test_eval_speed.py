"""Evaluation work saved without changing its results: length-sorted batches give the metrics of row-order
batches (oracles below evaluate each row on its own), and an unchanged model is not evaluated twice."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fs_gmfl.bench.perf import evaluate_in_row_order
from fs_gmfl.hosts.common.corpus import Encoded
from fs_gmfl.hosts.common.llm_eval import length_sorted_batches
from fs_gmfl.hosts.sim.runner import Simulation, adapters_fingerprint
from fs_gmfl.hosts.sim.training import evaluate


def ragged(n: int, width: int, vocab: int, *, labels: str, seed: int = 0) -> Encoded:
    """``n`` right-padded rows of random lengths 2..width; class labels or next-token labels (-100 on padding)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (n,), generator=gen)
    ids = torch.randint(3, vocab, (n, width), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    y = torch.randint(0, 3, (n,), generator=gen) if labels == "class" else ids.masked_fill(mask == 0, -100)
    return Encoded(ids, mask, y, torch.zeros(n, dtype=torch.long))


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     num_labels=3, max_position_embeddings=32)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()


def test_length_sorted_batches_cover_every_row_once_longest_first():
    lengths = torch.tensor([3, 9, 1, 9, 4, 7, 2])
    batches = length_sorted_batches(lengths, 3)
    assert [b.tolist() for b in batches] == [[1, 3, 5], [4, 0, 6], [2]]


def test_sorted_classification_metrics_equal_row_order_and_row_by_row(bert):
    data = ragged(37, 20, 50, labels="class")
    now = evaluate(bert, data, batch_size=8, task="seq_cls")
    before = evaluate_in_row_order(bert, data, batch_size=8)
    with torch.no_grad():  # oracle: every row alone, unpadded
        logits = torch.cat([bert(input_ids=data.input_ids[i:i + 1, :int(data.attention_mask[i].sum())]).logits
                            for i in range(len(data))])
    assert now["acc"] == before["acc"] == int((logits.argmax(-1) == data.labels).sum()) / len(data)
    expected = float(F.cross_entropy(logits, data.labels))
    assert now["loss"] == pytest.approx(expected, rel=1e-5) and before["loss"] == pytest.approx(expected, rel=1e-5)


def test_sorted_causal_lm_loss_equals_row_by_row(gpt2):
    data = ragged(23, 16, 50, labels="lm", seed=1)
    now = evaluate(gpt2, data, batch_size=5, task="causal_lm")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            n = int(data.attention_mask[i].sum())
            logits = gpt2(input_ids=data.input_ids[i:i + 1, :n]).logits[0]
            total += float(F.cross_entropy(logits[:-1], data.input_ids[i, 1:n], reduction="sum"))
            count += n - 1
    assert now["loss"] == pytest.approx(total / count, rel=1e-5)
    assert now["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_fingerprint_sees_values_dtypes_shapes_and_names():
    base = {"": {"a": torch.ones(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}}
    same = {"": {"b": torch.zeros(2, dtype=torch.bfloat16), "a": torch.ones(2, 3)}}
    assert adapters_fingerprint(base) == adapters_fingerprint(same)
    changed = [{"": {"a": torch.ones(2, 3).index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(1.0001)),
                     "b": torch.zeros(2, dtype=torch.bfloat16)}},
               {"": {"a": torch.ones(3, 2), "b": torch.zeros(2, dtype=torch.bfloat16)}},
               {"": {"a": torch.ones(2, 3), "b": torch.zeros(2, dtype=torch.float16)}},
               {"": {"a": torch.ones(2, 3), "c": torch.zeros(2, dtype=torch.bfloat16)}},
               {"x": {"a": torch.ones(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}},
               {"": {"a": torch.ones(2, 3), "b": torch.tensor([-0.0, 0.0], dtype=torch.bfloat16)}}]
    assert len({adapters_fingerprint(c) for c in changed} | {adapters_fingerprint(base)}) == len(changed) + 1


def test_an_unchanged_model_is_not_evaluated_again(tiny, single_thread, monkeypatch):
    """Every client drops out: rounds 2 and 4 evaluate the round-0 model again, so the metrics are reused (counted)
    and the evaluation code runs once; in a normal run every evaluation runs."""
    calls = []
    original = Simulation._evaluate_splits
    monkeypatch.setattr(Simulation, "_evaluate_splits", lambda self, prefix: calls.append(prefix)
                        or original(self, prefix))
    summary = Simulation(tiny("faults.dropout_before", "1.0"), quiet=True).run()
    assert summary["timing"]["evaluations_reused"] == 2 and len(calls) == 1
    evaluated = [r for r in summary["per_round"] if "test_acc" in r]
    assert [r["round"] for r in evaluated] == [0, 2, 4]
    assert all(r["test_acc"] == evaluated[0]["test_acc"] and r["test_loss"] == evaluated[0]["test_loss"]
               for r in evaluated)
    calls.clear()
    summary = Simulation(tiny("expname", "normal"), quiet=True).run()
    assert summary["timing"]["evaluations_reused"] == 0 and len(calls) == 3
