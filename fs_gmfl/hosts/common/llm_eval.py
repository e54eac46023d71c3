"""Evaluation of causal LMs on instruction data: response-token loss and generation-based exact match.

Metric names follow FederatedScope-LLM's trainer and monitor, per split:

* ``<split>_loss``: sum over batches of the batch's mean response-token loss
  times the batch size, ``<split>_total``: rows, ``<split>_avg_loss``: their
  ratio (what FederatedScope reports for ``eval.metrics: ['loss']``);
* ``<split>_token_loss``: mean cross-entropy over all response tokens, and
  ``<split>_ppl = exp(token_loss)``;
* ``<split>_exact_match``: the share of rows whose greedy answer equals the
  reference after :func:`normalize_answer` (only when requested).

Batches are sorted by length (less padding), run under ``torch.inference_mode``
and the greedy decoding uses the KV cache with left-padded prompts.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationConfig

from fs_gmfl.core.seeding import generator
from fs_gmfl.hosts.common.causal_data import IGNORE_INDEX, CausalEncoded, special_ids

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """The first non-empty line, lower-cased, without punctuation and articles, whitespace collapsed.

    (SQuAD's answer normalisation applied to the answer's first line, so text
    the model appends after its answer on later lines does not count.)
    """
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    return " ".join(_ARTICLES.sub(" ", line.lower().translate(_PUNCTUATION)).split())


@dataclass
class EvalSettings:
    """What to measure and how (``eval.*``)."""

    batch_size: int
    max_new_tokens: int
    generation_rows: int = 0
    exact_match: bool = True
    loss: bool = True
    seed: int = 0


def length_sorted_batches(lengths: Tensor, batch_size: int) -> list[Tensor]:
    """Row indices grouped into batches of similar length (longest first)."""
    order = torch.argsort(lengths, descending=True, stable=True)
    return list(torch.split(order, batch_size))


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The model's decoder and output embedding (vocabulary projection), or ``None`` where it exposes neither."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is inner:
        return None
    return decoder, head


def response_logits(model: nn.Module, inputs: dict[str, Tensor], keep: Tensor, *,
                    use_cache: bool = False) -> tuple[Tensor, object]:
    """Next-token logits at the positions ``keep`` (``[batch, length - 1]``) only, and the KV cache if asked.

    The vocabulary projection is applied to those hidden states alone (the
    decoder's output, then the output embedding), instead of to every position:
    for SmolLM2 (49,152 words) that is most of the memory of an evaluation
    batch. Models without ``get_decoder``/``get_output_embeddings`` get the
    full forward pass.
    """
    parts = decoder_and_head(model)
    if parts is None:
        out = model(**inputs, use_cache=use_cache)
        return out.logits[:, :-1][keep], out.past_key_values
    decoder, head = parts
    out = decoder(**inputs, use_cache=use_cache)
    return head(out.last_hidden_state[:, :-1][keep]), out.past_key_values


class ResponseLoss:
    """Running FederatedScope-style ``loss``/``total``/``avg_loss`` and per-token ``token_loss``/``ppl``."""

    def __init__(self) -> None:
        self.fs_loss, self.token_sum, self.tokens = 0.0, 0.0, 0

    def add(self, logits: Tensor, targets: Tensor, rows: int) -> None:
        """One batch of ``rows`` rows: the logits and targets of its response tokens."""
        if not len(targets):
            return
        batch_sum = float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        self.token_sum += batch_sum
        self.tokens += len(targets)
        self.fs_loss += batch_sum / len(targets) * rows

    def metrics(self, total_rows: int) -> dict[str, float]:
        """The metrics over every batch added (empty if no response token was seen)."""
        if self.tokens == 0:
            return {}
        token_loss = self.token_sum / self.tokens
        return {"loss": self.fs_loss, "total": float(total_rows), "avg_loss": self.fs_loss / total_rows,
                "token_loss": token_loss, "ppl": math.exp(min(token_loss, 50.0))}


@torch.inference_mode()
def response_losses(model: nn.Module, data: CausalEncoded, *, batch_size: int,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """FederatedScope-style ``loss``/``total``/``avg_loss`` and per-token ``token_loss``/``ppl`` over ``data``."""
    tally = ResponseLoss()
    for index in length_sorted_batches(data.attention_mask.sum(dim=1), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(index).items()}
        target = batch.pop("labels")[:, 1:]
        keep = target != IGNORE_INDEX
        if bool(keep.any()):
            tally.add(response_logits(model, batch, keep)[0], target[keep], len(index))
    return tally.metrics(len(data))


def left_padded(prompts: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` of ``prompts`` padded on the left to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def greedy_answers(model: nn.Module, tokenizer: object, prompts: Sequence[Tensor], *, batch_size: int,
                   max_new_tokens: int, device: torch.device | str = "cpu") -> list[list[int]]:
    """Greedy continuations of ``prompts`` (new token ids, up to and without EOS), in input order."""
    pad, eos = special_ids(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=eos, use_cache=True)
    answers: list[list[int]] = [[] for _ in prompts]
    lengths = torch.tensor([len(p) for p in prompts])
    for index in length_sorted_batches(lengths, batch_size):
        ids, mask = left_padded([prompts[i] for i in index.tolist()], pad)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row, i in enumerate(index.tolist()):
            new = out[row, ids.shape[1]:].tolist()
            answers[i] = new[: new.index(eos)] if eos in new else new
    return answers


def decode(tokenizer: object, ids: Sequence[int]) -> str:
    """Text of ``ids`` without special tokens."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def generation_subset(n: int, rows: int, *, seed: int, split: str) -> Tensor:
    """The fixed rows exact match is measured on: all, or a seeded subset of ``rows``."""
    if rows <= 0 or rows >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator(seed, "generation-rows", split))[:rows].sort().values


def exact_match(model: nn.Module, tokenizer: object, data: CausalEncoded, settings: EvalSettings, *, split: str,
                device: torch.device | str = "cpu") -> float:
    """Share of rows whose normalised greedy answer equals the normalised reference.

    The reference is the row's response tokens decoded by the same tokenizer,
    so both sides see the same tokenisation artefacts.
    """
    rows = generation_subset(len(data), settings.generation_rows, seed=settings.seed, split=split).tolist()
    answers = greedy_answers(model, tokenizer, [data.prompt(i) for i in rows], batch_size=settings.batch_size,
                             max_new_tokens=settings.max_new_tokens, device=device)
    return share_matching(tokenizer, data, dict(zip(rows, answers)))


def prompt_aligned(prompts: Sequence[Tensor], responses: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor, int]:
    """``(input_ids, attention_mask, width)``: prompts left-padded to a common ``width``, responses after them,
    right-padded; every prompt ends at column ``width - 1``."""
    width = max(len(p) for p in prompts)
    total = width + max(len(r) for r in responses)
    ids = torch.full((len(prompts), total), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), total, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, width - len(p): width + len(r)] = torch.cat([p, r])
        mask[i, width - len(p): width + len(r)] = 1
    return ids, mask, width


@torch.inference_mode()
def losses_and_answers(model: nn.Module, tokenizer: object, data: CausalEncoded, generate: set[int], *,
                       batch_size: int, max_new_tokens: int, device: torch.device | str = "cpu",
                       ) -> tuple[dict[str, float], dict[int, list[int]]]:
    """:func:`response_losses` and the greedy answers of rows ``generate`` from one forward pass per batch.

    Each batch is laid out by :func:`prompt_aligned`; the teacher-forced pass
    over prompt + response gives the response-token losses, and its KV cache,
    cut back to the prompts, is the prefill from which the rows in
    ``generate`` decode greedily, so a prompt is encoded once, not twice.
    """
    pad, eos = special_ids(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=eos, use_cache=True)
    tally = ResponseLoss()
    answers: dict[int, list[int]] = {}
    lengths = data.attention_mask.sum(dim=1)
    for index in length_sorted_batches(lengths, batch_size):
        rows = index.tolist()
        prompts = [data.prompt(i) for i in rows]
        responses = [data.input_ids[i, int(data.prompt_lengths[i]): int(lengths[i])] for i in rows]
        ids, mask, width = prompt_aligned(prompts, responses, pad)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # counted from each row's first real token
        keep = mask[:, 1:].bool() & (torch.arange(1, ids.shape[1], device=ids.device) >= width)
        logits, cache = response_logits(model, {"input_ids": ids, "attention_mask": mask, "position_ids": positions},
                                        keep, use_cache=True)
        tally.add(logits, ids[:, 1:][keep], len(rows))
        chosen = [k for k, i in enumerate(rows) if i in generate]
        if not chosen:
            continue
        cache.crop(-(cache.get_seq_length() - (width - 1)))
        if len(chosen) < len(rows):
            cache.batch_select_indices(torch.tensor(chosen, device=ids.device))
        out = model.generate(input_ids=ids[chosen, :width], attention_mask=mask[chosen, :width],
                             past_key_values=cache, generation_config=config)
        for row, k in enumerate(chosen):
            new = out[row, width:].tolist()
            answers[rows[k]] = new[: new.index(eos)] if eos in new else new
    return tally.metrics(len(data)), answers


def share_matching(tokenizer: object, data: CausalEncoded, answers: dict[int, list[int]]) -> float:
    """Share of ``answers`` (row -> generated ids) whose normalised text equals the row's normalised reference."""
    if not answers:
        return float("nan")
    hits = 0
    for i, answer in answers.items():
        reference_ids = data.labels[i][data.labels[i] != IGNORE_INDEX].tolist()
        hits += normalize_answer(decode(tokenizer, answer)) == normalize_answer(decode(tokenizer, reference_ids))
    return hits / len(answers)


def evaluate_causal_lm(model: nn.Module, tokenizer: object, data: CausalEncoded, settings: EvalSettings, *,
                       split: str, device: torch.device | str = "cpu") -> dict[str, float]:
    """The metrics of ``settings`` on ``data`` (names without the split prefix).

    With both loss and exact match the generation reuses the loss pass's
    prefill (:func:`losses_and_answers`); alone, each has its own pass.
    """
    model.eval()
    metrics: dict[str, float] = {}
    if settings.loss and settings.exact_match and len(data):
        rows = generation_subset(len(data), settings.generation_rows, seed=settings.seed, split=split).tolist()
        losses, answers = losses_and_answers(model, tokenizer, data, set(rows), batch_size=settings.batch_size,
                                             max_new_tokens=settings.max_new_tokens, device=device)
        return {**losses, "exact_match": share_matching(tokenizer, data, answers)}
    if settings.loss:
        metrics.update(response_losses(model, data, batch_size=settings.batch_size, device=device))
    if settings.exact_match and len(data):
        metrics["exact_match"] = exact_match(model, tokenizer, data, settings, split=split, device=device)
    return metrics
