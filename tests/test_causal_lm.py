"""Causal-LM instruction tuning in the simulator: prompt, labels, truncation, splitters, evaluation, every method."""

from __future__ import annotations

import json

import pytest
import torch
from method_cases import registered_cases  # noqa: E402

from fs_gmfl.config import load_config
from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.common.causal_data import (IGNORE_INDEX, alpaca_prompt, encode_instruction_rows, fit_to_length,
                                              meta_partition, rows_from_corpus)
from fs_gmfl.hosts.common.corpus import HashTokenizer, TextCorpus
from fs_gmfl.hosts.common.instructions import InstructionRow
from fs_gmfl.hosts.common.llm_eval import (EvalSettings, exact_match, greedy_answers, losses_and_answers,
                                           normalize_answer, response_losses)
from fs_gmfl.hosts.common.models import build_backbone
from fs_gmfl.hosts.sim.runner import Simulation

pytestmark = pytest.mark.usefixtures("single_thread")

OPS = {"add": "+", "sub": "-", "mul": "*"}


def write_math_jsonl(path, n: int = 60) -> None:
    """FederatedScope-LLM records: 'Compute a op b.' -> the result, category = the operation."""
    rows = []
    for i in range(n):
        cat = list(OPS)[i % 3]
        a, b = i % 7, (3 * i) % 5
        result = {"add": a + b, "sub": a - b, "mul": a * b}[cat]
        rows.append({"instruction": f"Compute {a} {OPS[cat]} {b}.", "output": str(result), "category": cat})
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")


def causal_config(tmp_path, *overrides: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_math_jsonl(tmp_path / "math.jsonl")
    return load_config(None, [
        "model.type", "tiny_llama", "model.hidden_size", "16", "model.num_heads", "2", "model.vocab_size", "200",
        "data.type", "math.jsonl@llm", "data.root", str(tmp_path), "data.splitter", "meta",
        "federate.client_num", "3", "federate.sample_client_num", "2", "federate.total_round_num", "2",
        "train.local_update_steps", "2", "dataloader.batch_size", "4", "llm.tok_len", "48",
        "llm.adapter.args", "[{r: 4, lora_alpha: 8}]", "eval.batch_size", "8", "eval.max_new_tokens", "3",
        "eval.metrics", "[loss, exact_match]", "outdir", str(tmp_path / "exp"), *overrides])


# -- prompt and labels -------------------------------------------------------------------------------------------
def test_prompt_is_federatedscope_llm_alpaca_template():
    no_input = alpaca_prompt(InstructionRow("Say hi.", "", "hi", ""))
    with_input = alpaca_prompt(InstructionRow("Add.", "2 and 3", "5", ""))
    assert no_input == ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:")
    assert with_input == ("Below is an instruction that describes a task, paired with an input that provides "
                          "further context. Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:")


def test_labels_cover_the_response_and_eos_only():
    tok = HashTokenizer(500)
    row = InstructionRow("Compute 2 + 3.", "", "5", "add")
    enc, report = encode_instruction_rows([row], tok, max_length=64, min_response_fraction=0.25,
                                          categories=["add"])
    prompt = [1, *tok.word_ids(alpaca_prompt(row))]
    response = [*tok.word_ids("5"), 2]
    n = len(prompt) + len(response)
    assert enc.input_ids[0, :n].tolist() == prompt + response
    assert enc.labels[0].tolist() == [IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * (64 - n)
    assert enc.attention_mask[0].sum() == n and int(enc.prompt_lengths[0]) == len(prompt)
    assert report.rows == 0 and enc.references == ["5"]


@pytest.mark.parametrize("prompt_len,response_len,max_len,expected", [
    (5, 3, 8, (5, 3)),            # fits exactly
    (20, 2, 8, (6, 2)),           # long prompt: cut from the left, the whole short response kept
    (20, 10, 8, (6, 2)),          # both long: the response keeps ceil(0.25 * 8) = 2 tokens
    (4, 10, 8, (4, 4)),           # the response takes what the whole prompt leaves
    (2, 20, 8, (2, 6)),           # long response: cut from the right after the whole prompt
])
def test_truncation_keeps_a_response(prompt_len, response_len, max_len, expected):
    prompt, response = list(range(100, 100 + prompt_len)), list(range(200, 200 + response_len))
    kept_prompt, kept_response = fit_to_length(prompt, response, max_len, 0.25)
    assert (len(kept_prompt), len(kept_response)) == expected
    assert kept_prompt == prompt[prompt_len - expected[0]:] and kept_response == response[:expected[1]]


def test_truncation_is_counted_and_reported(tmp_path):
    cfg = causal_config(tmp_path, "llm.tok_len", "24", "federate.total_round_num", "1")
    summary = Simulation(cfg, quiet=True).run()
    truncated = summary["data"]["truncated"]
    assert truncated["rows"] == 60 and truncated["prompts_cut"] == 60 and truncated["responses_cut"] == 0


def test_classification_rows_answer_with_the_label_name():
    corpus = TextCorpus("c", ["good film", "bad film"], [1, 0], ["rotten", "fresh"])
    rows = rows_from_corpus(corpus)
    assert [(r.input, r.output, r.category) for r in rows] == [("good film", "fresh", "fresh"),
                                                               ("bad film", "rotten", "rotten")]
    assert rows[0].instruction == "Classify the text. Answer with one of: rotten, fresh."


# -- splitters ---------------------------------------------------------------------------------------------------
def test_meta_splitter_gives_each_client_whole_categories():
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    shards = meta_partition(groups, 3, seed=0)
    assert sorted(sorted(set(groups[s].tolist())) for s in shards) == [[0], [1], [2]]
    assert sorted(torch.cat(shards).tolist()) == list(range(7))
    merged = meta_partition(groups, 2, seed=0)
    assert sorted(len(set(groups[s].tolist())) for s in merged) == [1, 2]
    with pytest.raises(ConfigError, match="federate.client_num"):
        meta_partition(groups, 4, seed=0)


# -- evaluation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("The Answer is 42.\nmore text", "answer is 42"), ("  \n 3,000 ", "3000"), ("An apple!", "apple"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def tiny_causal_model(tmp_path):
    cfg = causal_config(tmp_path)
    backbone = build_backbone(cfg)
    backbone.model.eval()
    return backbone.model, HashTokenizer(200)


def test_batched_left_padded_cached_greedy_equals_a_plain_loop(tmp_path):
    model, tok = tiny_causal_model(tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():  # a LoRA that does something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prompts = [torch.randint(3, 200, (n,)) for n in (3, 9, 5, 12)]
    answers = greedy_answers(model, tok, prompts, batch_size=3, max_new_tokens=5)
    for prompt, answer in zip(prompts, answers):
        ids, expected = prompt.unsqueeze(0), []
        with torch.no_grad():
            for _ in range(5):  # no cache, no padding: argmax of the full forward pass
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                expected.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert answer == expected


def test_response_losses_match_the_models_own_loss(tmp_path):
    model, tok = tiny_causal_model(tmp_path)
    rows = [InstructionRow(f"Compute {i} + 1.", "", str(i + 1), "add") for i in range(5)]
    enc, _ = encode_instruction_rows(rows, tok, max_length=48, min_response_fraction=0.25, categories=["add"])
    per_row = []
    with torch.no_grad():
        for i in range(5):
            batch = enc.batch(torch.tensor([i]))
            per_row.append(float(model(**batch).loss))
    one = response_losses(model, enc, batch_size=1)
    assert one["avg_loss"] == pytest.approx(sum(per_row) / 5, rel=1e-5)
    assert one["total"] == 5 and one["loss"] == pytest.approx(sum(per_row), rel=1e-5)
    tokens = int((enc.labels[:, 1:] != IGNORE_INDEX).sum())
    assert tokens == 10  # one digit and EOS per row
    assert response_losses(model, enc, batch_size=4)["token_loss"] == pytest.approx(sum(per_row) * 2 / tokens,
                                                                                     rel=1e-5)


def test_one_pass_losses_and_answers_equal_separate_passes(tmp_path):
    """The loss pass's KV cache, cut back to the prompts, decodes exactly what a fresh greedy pass decodes."""
    model, tok = tiny_causal_model(tmp_path)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rows = [InstructionRow("Compute " + "x " * k, "", " ".join(["7"] * (1 + k % 4)), "add") for k in range(11)]
    enc, _ = encode_instruction_rows(rows, tok, max_length=48, min_response_fraction=0.25, categories=["add"])
    chosen = {0, 3, 4, 7, 10}  # a subset, so some batches decode only some of their rows
    losses, answers = losses_and_answers(model, tok, enc, chosen, batch_size=4, max_new_tokens=6)
    reference = response_losses(model, enc, batch_size=4)
    assert set(losses) == set(reference)
    assert all(losses[k] == pytest.approx(reference[k], rel=1e-5) for k in reference)
    order = sorted(chosen)
    fresh = greedy_answers(model, tok, [enc.prompt(i) for i in order], batch_size=4, max_new_tokens=6)
    assert answers == dict(zip(order, fresh))
    assert any(len(a) > 0 for a in fresh)


class EchoModel(torch.nn.Module):
    """``generate`` answers rows whose prompt has an even length with their reference, others with junk."""

    def __init__(self, answers: dict[int, list[int]]):
        super().__init__()
        self.answers = answers

    def generate(self, input_ids, attention_mask, generation_config):
        width = input_ids.shape[1]
        out = []
        for ids, mask in zip(input_ids, attention_mask):
            length = int(mask.sum())
            new = self.answers[length] if length % 2 == 0 else [7, 7, 2]
            out.append(torch.cat([ids, torch.tensor(new + [0] * (4 - len(new)))]))
        return torch.stack(out)[:, : width + 4]


def test_exact_match_counts_rows_whose_answer_equals_the_reference():
    tok = HashTokenizer(500)
    rows = [InstructionRow("q " * k, "", f"answer {k}", "") for k in range(1, 7)]
    enc, _ = encode_instruction_rows(rows, tok, max_length=64, min_response_fraction=0.25, categories=[""])
    answers = {int(enc.prompt_lengths[i]): enc.labels[i][enc.labels[i] != IGNORE_INDEX].tolist() for i in range(6)}
    even = sum(int(enc.prompt_lengths[i]) % 2 == 0 for i in range(6))
    settings = EvalSettings(batch_size=4, max_new_tokens=4)
    assert exact_match(EchoModel(answers), tok, enc, settings, split="test") == pytest.approx(even / 6)
    assert 0 < even < 6


# -- whole runs ---------------------------------------------------------------------------------------------------
METHODS = registered_cases(variants={
    "gmfl_fedit": ["gmfl.use", "True", "gmfl.c", "0.5", "gmfl.period", "1"],
    "gmfl_ffa_lora": ["federate.method", "ffa_lora", "gmfl.use", "True", "gmfl.c", "0.5", "gmfl.period", "1"],
    "hafl_italora": ["federate.method", "hafl", "hafl.scheme", "truncation", "hafl.profiles",
                     "[{clients: [0], rank: 1}, {clients: [1, 2], rank: 4}]"],
    "hafl_ifalora": ["federate.method", "hafl", "hafl.scheme", "freezing", "hafl.profiles",
                     "[{clients: [0], freeze_ratio: 0.75}, {clients: [1, 2], freeze_ratio: 0.0}]"],
    "hafl_ifzlora": ["federate.method", "hafl", "hafl.scheme", "truncation", "hafl.aggregation", "zero_padding",
                     "hafl.profiles", "[{clients: [0], rank: 1}, {clients: [1, 2], rank: 4}]"],
    "hafl_homlora": ["federate.method", "hafl", "hafl.scheme", "truncation", "hafl.profiles",
                     "[{clients: [0, 1, 2], rank: 4}]"],
})


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "bf16"])
def test_every_method_instruction_tunes_a_causal_lm(tmp_path, method, half):
    extra = ["train.is_enable_half", "True"] if half else []
    cfg = causal_config(tmp_path, *METHODS[method], *extra)
    assert cfg.model.task == "causal_lm"
    sim = Simulation(cfg, quiet=True)
    summary = sim.run()
    assert summary["rejected_updates"]["total"] == 0
    final = summary["final"]
    assert {"test_loss", "test_avg_loss", "test_total", "test_token_loss", "test_ppl", "test_exact_match"} <= set(final)
    assert final["test_total"] == 6 and torch.isfinite(torch.tensor(final["test_avg_loss"]))
    dtype = torch.bfloat16 if half else torch.float32
    assert {t.dtype for t in sim.method.strategy.global_adapter().values()} == {dtype}
    moved = summary["per_round"][-1]["test_token_loss"] != summary["per_round"][0]["test_token_loss"]
    assert moved, "the global model did not change"


def test_half_precision_halves_the_uplink(tmp_path):
    full = Simulation(causal_config(tmp_path / "a"), quiet=True).run()["comm"]
    half = Simulation(causal_config(tmp_path / "b", "train.is_enable_half", "True"), quiet=True).run()["comm"]
    assert half["uplink_payload_bytes"] * 2 == full["uplink_payload_bytes"]


def test_training_lowers_the_response_loss(tmp_path):
    cfg = causal_config(tmp_path, "federate.total_round_num", "3", "train.local_update_steps", "15",
                        "train.optimizer.lr", "0.01", "eval.metrics", "[loss]", "model.hidden_size", "64")
    per_round = Simulation(cfg, quiet=True).run()["per_round"]
    assert per_round[0]["test_token_loss"] == pytest.approx(5.3, abs=0.1)  # ln(200): the random model is uniform
    assert per_round[-1]["test_token_loss"] < per_round[0]["test_token_loss"] - 0.5
    assert "test_exact_match" not in per_round[-1]


def test_autocast_trains_with_fp32_weights_and_uplinks(tmp_path):
    cfg = causal_config(tmp_path, "train.autocast", "bfloat16", "federate.total_round_num", "1")
    sim = Simulation(cfg, quiet=True)
    summary = sim.run()
    assert summary["precision"] == "fp32 weights, bfloat16 autocast"
    assert {t.dtype for t in sim.method.strategy.global_adapter().values()} == {torch.float32}
    assert summary["rejected_updates"]["total"] == 0


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    runs = [Simulation(causal_config(tmp_path / str(flag), "train.gradient_checkpointing", str(flag),
                                     "federate.total_round_num", "1"), quiet=True).run()
            for flag in (False, True)]
    assert runs[0]["final"]["test_token_loss"] == pytest.approx(runs[1]["final"]["test_token_loss"], rel=1e-5)


def test_task_is_resolved_from_the_data(tmp_path):
    assert causal_config(tmp_path).model.task == "causal_lm"
    assert load_config(None, ["data.type", "synthetic"]).model.task == "seq_cls"
    with pytest.raises(ConfigError, match="model.task"):
        causal_config(tmp_path, "model.task", "seq_cls")


def test_causal_lm_on_classification_data_answers_label_names(tmp_path):
    cfg = load_config(None, ["model.type", "tiny_gpt2", "model.hidden_size", "16", "model.vocab_size", "200",
                             "model.task", "causal_lm", "data.type", "synthetic", "data.synthetic_num_samples", "60",
                             "federate.client_num", "2", "federate.total_round_num", "1", "llm.tok_len", "32",
                             "train.local_update_steps", "1", "outdir", str(tmp_path)])
    summary = Simulation(cfg, quiet=True).run()
    assert summary["data"]["num_labels"] == 2 and "test_exact_match" in summary["final"]


def test_a_federatedscope_llm_config_runs_unchanged_in_the_simulator(tmp_path):
    """FederatedScope-LLM's alpaca baseline layout (keys and values as shipped), with only paths and sizes changed."""
    from fs_gmfl.hosts.fs.assets import write_tiny_llm_assets

    assets = write_tiny_llm_assets(tmp_path, rows=60)
    (tmp_path / "fs.yaml").write_text(f"""
use_gpu: True
device: 0
early_stop: {{patience: 0}}
federate: {{mode: standalone, client_num: 3, total_round_num: 1, save_to: x.ckpt, save_freq: 100,
           share_local_model: True, online_aggr: False}}
data: {{root: {assets}, type: 'instructions.json@llm', splits: [0.8, 0.1, 0.1], splitter: 'iid'}}
llm:
  tok_len: 256
  chat: {{max_len: 256}}
  adapter:
    use: True
    args: [ {{ 'adapter_package': 'peft', 'adapter_method': 'lora', 'r': 8, 'lora_alpha': 16, 'lora_dropout': 0.05 }} ]
dataloader: {{batch_size: 2}}
model: {{type: '{assets}@huggingface_llm'}}
train:
  local_update_steps: 2
  batch_or_epoch: batch
  optimizer: {{lr: 0.0003, weight_decay: 0.0}}
  is_enable_half: True
criterion: {{type: CrossEntropyLoss}}
trainer: {{type: llmtrainer}}
eval: {{freq: 50, metrics: ['loss'], best_res_update_round_wise_key: val_loss}}
outdir: {tmp_path / 'exp'}
""", encoding="utf-8")
    cfg = load_config(tmp_path / "fs.yaml")
    assert cfg.model.task == "causal_lm" and cfg.train.is_enable_half
    summary = Simulation(cfg, quiet=True).run()
    assert summary["rejected_updates"]["total"] == 0 and summary["precision"].startswith("bfloat16")
    assert set(summary["final"]) == {"test_loss", "test_total", "test_avg_loss", "test_token_loss", "test_ppl"}
    assert summary["data"] == {"type": "instructions.json@llm", "train": 48, "val": 6, "test": 6, "num_labels": 3,
                               "truncated": {"rows": 0, "prompts_cut": 0, "responses_cut": 0, "tok_len": 256}}


def test_a_huge_max_new_tokens_is_refused_before_anything_is_loaded(tmp_path):
    """10^12 new tokens: the KV cache of one batch of answers (keys and values, 8 rows x layers x 10^12 tokens x
    hidden 16 x 4 B) cannot fit; refused naming eval.max_new_tokens. With loss only (no decoding) the key is
    unused and not refused."""
    from fs_gmfl.hosts.common.preflight import check_run

    with pytest.raises(ConfigError, match="eval.max_new_tokens"):
        check_run(causal_config(tmp_path, "eval.max_new_tokens", str(10 ** 12)))
    check_run(causal_config(tmp_path, "eval.max_new_tokens", str(10 ** 12), "eval.metrics", "[loss]"))


def test_prompt_plus_answer_must_fit_the_position_table(tmp_path):
    """max_position_embeddings 64, tok_len 48: at most 16 new tokens."""
    from fs_gmfl.hosts.common.preflight import check_sequence_length, shape_of

    shape = shape_of(causal_config(tmp_path), {"max_position_embeddings": 64, "hidden_size": 16})
    check_sequence_length(causal_config(tmp_path, "eval.max_new_tokens", "16"), shape)
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens.*at most 16"):
        check_sequence_length(causal_config(tmp_path, "eval.max_new_tokens", "17"), shape)
