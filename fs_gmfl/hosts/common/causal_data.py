"""Instruction tuning data for causal LMs: prompt template, tokenisation, response-only labels.

Rows are FederatedScope-LLM records (``instruction``, ``input``, ``output``,
``category``; see :mod:`fs_gmfl.hosts.common.instructions`). Each becomes

* the prompt: FederatedScope-LLM's Alpaca template (with or without the
  ``### Input:`` block), tokenised with the tokenizer's default special
  tokens (a BOS where the tokenizer adds one);
* the response: ``output`` followed by the EOS token.

Labels are the token ids on response positions and ``-100`` elsewhere, so the
loss covers the response tokens only (prompt and padding are masked), as in
FederatedScope-LLM.

Truncation to ``llm.tok_len`` never drops a response silently: when prompt and
response do not fit, the response keeps ``min(len, max(tok_len - prompt,
ceil(min_response_fraction * tok_len)))`` tokens and the prompt is cut from
the left (its end, ``### Response:``, stays next to the response). Cut rows
are counted in a :class:`TruncationReport`. Prompt and response are tokenised
separately, so the prompt the model is trained on is exactly the prompt it is
given at generation time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fs_gmfl.config.schema import DataConfig, is_instruction_data_type
from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.common.corpus import Encoded, HashTokenizer, TextCorpus, read_corpus, synthetic_dataset
from fs_gmfl.hosts.common.instructions import InstructionRow, read_instruction_set

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: FederatedScope-LLM's prompt (the Stanford Alpaca template), with and without an input.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")

#: instruction of classification rows turned into instruction rows (``model.task: causal_lm`` on a labelled corpus).
CLASSIFY_INSTRUCTION = "Classify the text. Answer with one of: {labels}."


def alpaca_prompt(row: InstructionRow) -> str:
    """The prompt of ``row`` (FederatedScope-LLM's template; the input block only when ``input`` is not empty)."""
    if row.input:
        return PROMPT_WITH_INPUT.format(instruction=row.instruction, input=row.input)
    return PROMPT_NO_INPUT.format(instruction=row.instruction)


def rows_from_corpus(corpus: TextCorpus) -> list[InstructionRow]:
    """Classification rows as instruction rows: answer with the label name; the label is the category."""
    instruction = CLASSIFY_INSTRUCTION.format(labels=", ".join(corpus.label_names))
    return [InstructionRow(instruction, text, corpus.label_names[label], corpus.label_names[label])
            for text, label in zip(corpus.texts, corpus.labels)]


def special_ids(tokenizer: object) -> tuple[int, int]:
    """``(pad_id, eos_id)`` of ``tokenizer``."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if eos is None:
        raise ConfigError("model.type", getattr(tokenizer, "name_or_path", "?"), "a tokenizer with an EOS token "
                          "for causal_lm")
    return (eos if pad is None else pad), eos


def prompt_ids(tokenizer: object, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's default special tokens (no EOS for the hash tokenizer)."""
    if isinstance(tokenizer, HashTokenizer):
        return [tokenizer.bos_token_id, *tokenizer.word_ids(text)]
    return list(tokenizer(text)["input_ids"])


def response_ids(tokenizer: object, text: str) -> list[int]:
    """Token ids of a response followed by EOS."""
    _, eos = special_ids(tokenizer)
    if isinstance(tokenizer, HashTokenizer):
        return [*tokenizer.word_ids(text), eos]
    return [*tokenizer(text, add_special_tokens=False)["input_ids"], eos]


@dataclass
class TruncationReport:
    """How many rows did not fit ``llm.tok_len`` and what was cut."""

    rows: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    tok_len: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain data for ``summary.json``."""
        return {"rows": self.rows, "prompts_cut": self.prompts_cut, "responses_cut": self.responses_cut,
                "tok_len": self.tok_len}


def fit_to_length(prompt: list[int], response: list[int], max_length: int,
                  min_response_fraction: float) -> tuple[list[int], list[int]]:
    """Cut ``prompt`` (from the left) and ``response`` (from the right) so that both fit ``max_length``."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    floor = min(max_length - 1, math.ceil(min_response_fraction * max_length))
    keep_response = min(len(response), max(max_length - len(prompt), floor))
    keep_prompt = max_length - keep_response
    return prompt[len(prompt) - keep_prompt:], response[:keep_response]


@dataclass
class CausalEncoded(Encoded):
    """Right-padded prompt + response rows with response-only labels.

    ``prompt_lengths[i]`` is the number of prompt tokens of row ``i`` (the
    generation prompt is ``input_ids[i, :prompt_lengths[i]]``); ``references``
    are the raw ``output`` strings for exact match.
    """

    prompt_lengths: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    references: list[str] = field(default_factory=list)

    def subset(self, index: Tensor) -> CausalEncoded:
        """The rows ``index``."""
        rows = index.tolist()
        return CausalEncoded(self.input_ids[index], self.attention_mask[index], self.labels[index],
                             self.groups[index], self.prompt_lengths[index], [self.references[i] for i in rows])

    def prompt(self, i: int) -> Tensor:
        """Token ids of row ``i``'s prompt."""
        return self.input_ids[i, : int(self.prompt_lengths[i])]


def encode_instruction_rows(rows: Sequence[InstructionRow], tokenizer: object, *, max_length: int,
                            min_response_fraction: float,
                            categories: Sequence[str]) -> tuple[CausalEncoded, TruncationReport]:
    """Tokenise ``rows`` into a :class:`CausalEncoded` (``groups`` index ``categories``)."""
    pad, _ = special_ids(tokenizer)
    report = TruncationReport(tok_len=max_length)
    n = len(rows)
    ids = torch.full((n, max_length), pad, dtype=torch.long)
    mask = torch.zeros(n, max_length, dtype=torch.long)
    labels = torch.full((n, max_length), IGNORE_INDEX, dtype=torch.long)
    prompt_lengths = torch.zeros(n, dtype=torch.long)
    category_index = {c: i for i, c in enumerate(categories)}
    for i, row in enumerate(rows):
        prompt, response = prompt_ids(tokenizer, alpaca_prompt(row)), response_ids(tokenizer, row.output)
        kept_prompt, kept_response = fit_to_length(prompt, response, max_length, min_response_fraction)
        report.rows += len(kept_prompt) + len(kept_response) < len(prompt) + len(response)
        report.prompts_cut += len(kept_prompt) < len(prompt)
        report.responses_cut += len(kept_response) < len(response)
        tokens = kept_prompt + kept_response
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
        labels[i, len(kept_prompt): len(tokens)] = torch.tensor(kept_response)
        prompt_lengths[i] = len(kept_prompt)
    groups = torch.tensor([category_index[r.category] for r in rows], dtype=torch.long)
    encoded = CausalEncoded(ids, mask, labels, groups, prompt_lengths, [r.output for r in rows])
    return encoded, report


def meta_partition(groups: Tensor, num_clients: int, *, seed: int) -> list[Tensor]:
    """FederatedScope's meta splitter: each category's rows go to one client.

    Categories are shuffled (seeded) and category ``i`` goes to client ``i mod
    num_clients``, so with as many clients as categories each client holds
    exactly one category (FederatedScope's ``MetaSplitter`` intends this
    merge; its current code returns one slice per category regardless).

    Raises:
        ConfigError: more clients than categories (a client would have no data).
    """
    categories = torch.unique(groups).tolist()
    if num_clients > len(categories):
        raise ConfigError("federate.client_num", num_clients, f"at most the {len(categories)} categories of the "
                          "training data with data.splitter 'meta' (one category per client)")
    rng = np.random.default_rng(derive_seed(seed, "meta"))
    order = [categories[i] for i in rng.permutation(len(categories))]
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for position, category in enumerate(order):
        shards[position % num_clients].extend(torch.nonzero(groups == category).flatten().tolist())
    return [torch.tensor(sorted(s), dtype=torch.long) for s in shards]


def synthetic_corpus(cfg: DataConfig, *, vocab_size: int, max_length: int, seed: int) -> TextCorpus:
    """The ``synthetic`` classification data as texts (token ``t`` written ``w<t>``), for causal_lm runs."""
    pool = synthetic_dataset(cfg, vocab_size=vocab_size, max_length=max_length // 2, seed=seed)
    texts = [" ".join(f"w{int(t)}" for t, m in zip(ids, mask) if m and t > 2)
             for ids, mask in zip(pool.input_ids, pool.attention_mask)]
    names = [f"class{c}" for c in range(cfg.synthetic_num_classes)]
    return TextCorpus("synthetic", texts, pool.labels.tolist(), names)


def instruction_rows(cfg: DataConfig, *, max_length: int, seed: int) -> tuple[list[InstructionRow], str]:
    """The instruction rows of ``data.type`` (classification data as 'answer with the label' rows) and a name."""
    if is_instruction_data_type(cfg.type):
        found = read_instruction_set(cfg.type, cfg.root)
        return found.rows, found.name
    corpus = (synthetic_corpus(cfg, vocab_size=1000, max_length=max_length, seed=seed) if cfg.type == "synthetic"
              else read_corpus(cfg))
    return rows_from_corpus(corpus), corpus.name


def instruction_pool(cfg: DataConfig, tokenizer: object, *, max_length: int, seed: int,
                     min_response_fraction: float) -> tuple[CausalEncoded, list[str], TruncationReport]:
    """All rows of ``data.type`` tokenised for causal-LM training, their category names and the truncation counts.

    Raises:
        InputError: no rows.
    """
    rows, name = instruction_rows(cfg, max_length=max_length, seed=seed)
    if not rows:
        raise InputError(f"data.type '{cfg.type}' has no rows")
    categories = sorted({r.category for r in rows})
    encoded, report = encode_instruction_rows(rows, tokenizer, max_length=max_length,
                                              min_response_fraction=min_response_fraction, categories=categories)
    if report.rows:
        logger.warning("%s: %d of %d rows exceed llm.tok_len %d (prompts cut: %d, responses cut: %d; no response "
                       "is dropped whole)", name, report.rows, len(rows), max_length, report.prompts_cut,
                       report.responses_cut)
    return encoded, [c or "(none)" for c in categories], report
