"""Data sanity checks of the embedded simulator: what is an error and what is a warning.

Errors (one line, exit 2), raised before training starts:

* a row of a user data file whose ``text`` or ``label`` is missing, null or
  empty (:func:`check_rows`);
* a classification dataset with fewer than two classes
  (``model.task: seq_cls``): accuracy would be 1.0 by construction;
* ``model.num_labels`` smaller than the data's classes (the head could not
  represent them);
* fewer training rows than ``federate.client_num`` × the lda ``min_size``
  (no Dirichlet draw could succeed; refused before drawing);
* no requested evaluation split (``eval.split``) has a row and no client
  holds a local validation shard: the run could report nothing.

Warnings (logged and listed under ``warnings`` in ``summary.json``):

* one of the requested evaluation splits is empty while another split (or
  the clients' local validation shards) still gives metrics;
* the training split holds only one class although the dataset has more.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from fs_gmfl.config.schema import RunConfig
from fs_gmfl.errors import ConfigError, InputError

logger = logging.getLogger(__name__)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def check_rows(path: object, rows: Sequence[Any]) -> None:
    """Every row of a user data file has a non-empty ``text`` and ``label``.

    Raises:
        InputError: names the file, the first bad row (0-based, data rows) and the field.
    """
    for i, row in enumerate(rows):
        for field in ("label", "text"):
            if isinstance(row, dict) and field in row and _blank(row[field]):
                raise InputError(f"data file '{path}' row {i} has an empty or missing '{field}'; remove the row "
                                 f"or fill it in")


def check_partition_size(rows: int, num_clients: int, min_size: int) -> None:
    """Refuse an lda partition that cannot give every client ``min_size`` rows, before any draw."""
    if rows < num_clients * min_size:
        raise ConfigError("federate.client_num", num_clients, f"at most {rows // max(1, min_size)} clients: the "
                          f"{rows} training examples cannot give each client data.splitter_args min_size "
                          f"{min_size}")


def check_data(cfg: RunConfig, data: Any) -> list[str]:
    """Check the built :class:`~fs_gmfl.hosts.common.data.FederatedData` against ``cfg``; return the warnings.

    Raises:
        InputError: fewer than two classes for classification.
        ConfigError: ``model.num_labels`` below the data's classes, or nothing to evaluate.
    """
    warnings: list[str] = []
    if cfg.model.task == "seq_cls":
        _check_classes(cfg, data, warnings)
    _check_eval_splits(cfg, data, warnings)
    for text in warnings:
        logger.warning("%s", text)
    return warnings


def _check_classes(cfg: RunConfig, data: Any, warnings: list[str]) -> None:
    names = list(getattr(data, "label_names", []) or [])
    if data.num_labels < 2:
        shown = ", ".join(repr(n) for n in names[:3]) or "none"
        raise InputError(f"data '{cfg.data.type}' has {data.num_labels} class ({shown}); classification "
                         "(model.task 'seq_cls') needs at least two")
    if 0 < cfg.model.num_labels < data.num_labels:
        raise ConfigError("model.num_labels", cfg.model.num_labels, f"0 (take the data's) or at least the "
                          f"{data.num_labels} classes of data '{cfg.data.type}'")
    if len(data.train) and int(torch.unique(data.train.groups).numel()) < 2:
        warnings.append(f"the training split of data '{cfg.data.type}' holds only one of its {data.num_labels} "
                        "classes")


def _check_eval_splits(cfg: RunConfig, data: Any, warnings: list[str]) -> None:
    sizes = {split: len(data.val if split == "val" else data.test) for split in cfg.eval.split}
    empty = [s for s, n in sizes.items() if n == 0]
    if not empty:
        return
    local_val = cfg.data.client_val_fraction > 0
    fractions = f"data.splits = {list(cfg.data.splits)} gives {' and '.join(repr(s) for s in empty)} no examples"
    if len(empty) == len(sizes) and not local_val:
        raise ConfigError("eval.split", list(cfg.eval.split), f"a split with examples to evaluate on; {fractions} "
                          "(raise its fraction or evaluate another split)")
    warnings.append(f"{fractions}; eval.split {empty} is skipped")
