"""Splits, client partitions and the federated dataset of a run, for both hosts.

The rows come from :mod:`fs_gmfl.hosts.common.corpus` (text datasets) or, for
``model.task: causal_lm``, from :mod:`fs_gmfl.hosts.common.causal_data`
(instruction rows); this module splits them into train/validation/test and
partitions the training rows over the clients (``iid``, ``lda``, ``meta``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fs_gmfl.config.schema import DataConfig, RunConfig
from fs_gmfl.core.seeding import derive_seed, generator
from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.common.causal_data import instruction_pool, meta_partition
from fs_gmfl.hosts.common.corpus import Encoded, HashTokenizer, encode_texts, read_corpus, synthetic_dataset
from fs_gmfl.hosts.common.sanity import check_partition_size

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
