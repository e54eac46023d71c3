"""Offline assets for FederatedScope-LLM runs: a tiny causal LM directory and instruction data.

FederatedScope-LLM loads ``model.type: '<dir>@huggingface_llm'`` with
``from_pretrained`` and reads ``data.type: '<file>.json@llm'`` rows
``{instruction, input, output, category}`` from ``data.root``. Nothing can
be downloaded here, so this module builds both locally:

* :func:`make_tiny_causal_lm`: a randomly initialised Llama (rotary positions,
  so GSM8K's long few-shot prompt fits) with a byte-level BPE tokenizer
  trained on the instruction texts, saved with ``save_pretrained``;
* :func:`arithmetic_rows`: seeded word-arithmetic instructions in three
  categories (FederatedScope's ``meta`` splitter gives one per client);
* :func:`gsm8k_rows`: questions in GSM8K's test-file format (``#### <n>``).

``python -m fs_gmfl.hosts.fs.assets --out DIR`` writes ``DIR/tiny_llama/``
(model, tokenizer, ``instructions.json`` and ``gsm8k_test.jsonl``), which the
FederatedScope configs under ``yaml_configs/fs/`` use. No FederatedScope import.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

CATEGORIES = ("addition", "subtraction", "multiplication")
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def arithmetic_rows(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """``n`` instruction rows ``{instruction, input, output, category}`` (word arithmetic, three categories)."""
    rng = random.Random(seed)
    ops = {"addition": ("plus", lambda a, b: a + b), "subtraction": ("minus", lambda a, b: a - b),
           "multiplication": ("times", lambda a, b: a * b)}
    rows = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        word, fn = ops[category]
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        rows.append({"instruction": f"What is {a} {word} {b}?", "input": "",
                     "output": f"{a} {word} {b} is {fn(a, b)}. The answer is {fn(a, b)}.", "category": category})
    return rows


def gsm8k_rows(n: int, *, seed: int = 1) -> list[dict[str, str]]:
    """``n`` questions in the GSM8K test-file format (answer ends with ``#### <number>``)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        rows.append({"question": f"Sam has {a} marbles and finds {b} more. How many marbles does Sam have?",
                     "answer": f"Sam has {a} + {b} = {a + b} marbles.\n#### {a + b}"})
    return rows


def make_tiny_causal_lm(directory: str | Path, texts: Sequence[str], *, vocab_size: int = 400,
                        hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it with a random tiny Llama in ``directory``.

    The model's vocabulary equals the tokenizer's, and the tokenizer defines
    pad/bos/eos/unk, so FederatedScope adds no tokens and resizes nothing.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def write_tiny_llm_assets(root: str | Path, *, rows: int = 60, seed: int = 0) -> Path:
    """``root/tiny_llama/``: model + tokenizer, ``instructions.json`` and ``gsm8k_test.jsonl``."""
    out = Path(root) / "tiny_llama"
    instructions = arithmetic_rows(rows, seed=seed)
    questions = gsm8k_rows(2)
    texts = [f"{r['instruction']} {r['output']}" for r in instructions]
    texts += [f"{q['question']} {q['answer']}" for q in questions]
    make_tiny_causal_lm(out, texts, seed=seed)
    (out / "instructions.json").write_text(json.dumps(instructions, indent=1), encoding="utf-8")
    (out / "gsm8k_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m fs_gmfl.hosts.fs.assets --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".assets/fs", help="directory to write tiny_llama/ into")
    parser.add_argument("--rows", type=int, default=60, help="instruction rows")
    args = parser.parse_args(argv)
    print(write_tiny_llm_assets(args.out, rows=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
