"""Adapter keys and loading tensors into a peft model."""

from __future__ import annotations

import pytest
import torch

from fs_gmfl.core.adapter import (adapter_key, adapter_parameters, kind_of, load_adapter_tensors, load_model_tensors,
                                  lora_pairs)
from fs_gmfl.hosts.common.models import build_backbone
from fs_gmfl.hosts.sim.runner import temporarily_loaded, weighted_client_metrics


def test_adapter_key_removes_the_adapter_name():
    """peft names lose '.default.'; kinds are recognised."""
    name = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    key = adapter_key(name)
    assert key == "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    assert kind_of(key) == "lora_A"
    assert kind_of(adapter_key("base_model.model.classifier.modules_to_save.default.weight")) == "head"


def test_tiny_bert_adapter_structure(tiny):
    """tiny_bert, 2 layers, q and v: 8 LoRA tensors in 4 pairs plus a 2-tensor head."""
    model = build_backbone(tiny(), 2).model
    params = adapter_parameters(model)
    kinds = [kind_of(k) for k in params]
    assert kinds.count("lora_A") == 4 and kinds.count("lora_B") == 4 and kinds.count("head") == 2
    pairs = lora_pairs(params)
    assert len(pairs) == 4 and all(p.module.endswith(("query", "value")) for p in pairs)


def test_load_adapter_tensors_checks_keys_and_shapes(tiny):
    """Unknown keys and wrong shapes are refused."""
    model = build_backbone(tiny(), 2).model
    key = next(iter(adapter_parameters(model)))
    with pytest.raises(KeyError):
        load_adapter_tensors(model, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        load_adapter_tensors(model, {key: torch.zeros(99)})


def test_load_model_tensors_reaches_backbone_weights_and_evaluation_restores_them(tiny):
    """Plain parameter names address backbone weights; temporarily_loaded puts everything back."""
    model = build_backbone(tiny(), 2).model
    name = next(n for n, _ in model.named_parameters() if n.endswith("query.base_layer.weight"))
    lora = next(k for k in adapter_parameters(model) if ".lora_B." in k)
    weight = dict(model.named_parameters())[name]
    before_w, before_b = weight.detach().clone(), adapter_parameters(model)[lora].detach().clone()
    with temporarily_loaded(model, {name: torch.ones_like(weight), lora: torch.ones_like(before_b)}):
        assert torch.equal(weight, torch.ones_like(weight))
    assert torch.equal(weight, before_w) and torch.equal(adapter_parameters(model)[lora], before_b)
    load_model_tensors(model, {name: torch.zeros_like(weight)})
    assert float(weight.abs().sum()) == 0.0


def test_weighted_client_metrics():
    """Personalised summary: (10*0.5 + 30*0.9) / 40 = 0.8."""
    out = weighted_client_metrics([(10, {"acc": 0.5, "loss": 1.0}), (30, {"acc": 0.9, "loss": 2.0})])
    assert out == pytest.approx({"clients_val_acc": 0.8, "clients_val_loss": 1.75})
    assert weighted_client_metrics([]) == {}
