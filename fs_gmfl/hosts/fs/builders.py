"""fs_gmfl's datasets and backbones inside FederatedScope (``register_data`` / ``register_model``).

With ``data.type`` one of fs_gmfl's datasets (``rotten_tomatoes``,
``synthetic``, ``csv:<path>``, ...) and ``model.type: <backbone>@fs_gmfl_llm``
(``tiny_bert@fs_gmfl_llm``, ``minilm@fs_gmfl_llm``, ``<dir>@fs_gmfl_llm``),
FederatedScope trains exactly the simulator's model on the simulator's data:
the same tokenisation, split and client partition, the same initial adapter,
and each round's batches in the simulator's order (a round-aware batch
sampler plays :func:`fs_gmfl.hosts.common.batches.batch_schedule`;
``dataloader.shuffle`` does not apply). This is what makes the two hosts
comparable to float tolerance.

The model builder only sees ``cfg.model``, so the data builder, which sees the
whole config, writes the backbone spec (the run configuration as JSON and the
number of labels) into ``model.fs_gmfl_backbone``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from federatedscope.core.data import ClientData, StandaloneDataDict
from federatedscope.core.data.utils import convert_data_mode
from federatedscope.llm.model.adapter_builder import AdapterModel
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fs_gmfl.config.fields import build, to_dict
from fs_gmfl.config.schema import RunConfig
from fs_gmfl.errors import InputError
from fs_gmfl.hosts.common.batches import batch_schedule
from fs_gmfl.hosts.common.corpus import Encoded
from fs_gmfl.hosts.common.data import federated_data_for
from fs_gmfl.hosts.common.models import build_backbone, load_tokenizer
from fs_gmfl.hosts.fs.config import BACKBONE_KEY, is_sim_data, is_sim_model, owned_methods, to_run_config


class EncodedRows(Dataset):
    """Row indices of an :class:`Encoded` (the collate function gathers the rows)."""

    def __init__(self, encoded: Encoded) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> int:
        return index


class EncodedCollate:
    """Collate row indices into model inputs exactly as the simulator batches them."""

    def __init__(self, encoded: Encoded) -> None:
        self.encoded = encoded

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.encoded.batch(torch.tensor(indices, dtype=torch.long))


class RoundBatchSampler:
    """Plays the simulator's batch schedule of the current round, one FederatedScope epoch at a time.

    FederatedScope restarts the loader at every epoch and stops after the
    configured number of batches; each restart continues the round's
    schedule, so the batches of a round are exactly
    ``batch_schedule(n, cfg, rnd=rnd, client_id=client_id)``.
    """

    def __init__(self, n: int, cfg: RunConfig, client_id: int) -> None:
        self.n, self.cfg, self.client_id = n, cfg, client_id
        self._stream: Iterator[torch.Tensor] | None = None

    def start_round(self, rnd: int) -> None:
        """Start the schedule of round ``rnd`` (1-based)."""
        self._stream = batch_schedule(self.n, self.cfg, rnd=rnd, client_id=self.client_id)

    def __len__(self) -> int:
        return math.ceil(self.n / self.cfg.dataloader.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self._stream is None:
            self.start_round(0)
        for _ in range(len(self)):
            batch = next(self._stream, None)
            if batch is None:
                return
            yield batch.tolist()


def encoded_loader(encoded: Encoded, batch_size: int, sampler: RoundBatchSampler | None = None) -> DataLoader:
    """A loader over ``encoded``: the round's schedule (training) or sequential batches (evaluation)."""
    # A private generator: creating an iterator must not draw from the global RNG (which seeds dropout).
    rows, collate, own = EncodedRows(encoded), EncodedCollate(encoded), torch.Generator()
    if sampler is not None:
        return DataLoader(rows, batch_sampler=sampler, collate_fn=collate, generator=own)
    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=own)


class SimClientData(ClientData):
    """FederatedScope ``ClientData`` over the simulator's tokenised splits."""

    def __init__(self, client_cfg: Any, run_cfg: RunConfig, client_id: int | None, **splits: Encoded | None) -> None:
        self.run_cfg, self.client_id = run_cfg, client_id
        super().__init__(client_cfg, **splits)

    def setup(self, new_client_cfg: Any = None) -> bool:
        """(Re)build the loaders: the training split plays the round schedule."""
        self.client_cfg = new_client_cfg
        for name, encoded in zip(self.SPLIT_NAMES, (self.train_data, self.val_data, self.test_data)):
            if encoded is None or not len(encoded):
                continue
            sampler = RoundBatchSampler(len(encoded), self.run_cfg, self.client_id) if name == "train" else None
            self[name] = encoded_loader(encoded, self.run_cfg.dataloader.batch_size, sampler)
        return True


def build_fs_data(config: Any, client_cfgs: Any = None) -> tuple[Any, Any] | None:
    """FederatedScope data builder: fs_gmfl datasets for fs_gmfl methods (``None`` for anything else).

    Server (id 0) gets the validation and test splits; client ``i`` gets
    shard ``i - 1`` for training and its local validation rows
    (``data.client_val_fraction``) as ``val``.
    """
    if str(config.federate.method).lower() not in owned_methods() or not is_sim_data(str(config.data.type)):
        return None
    run_cfg = to_run_config(config)
    fed = federated_data_for(run_cfg, load_tokenizer(run_cfg))
    datadict: dict[int, ClientData] = {0: SimClientData(config, run_cfg, None, val=fed.val, test=fed.test)}
    for cid in range(run_cfg.federate.client_num):
        datadict[cid + 1] = SimClientData(_client_cfg(config, client_cfgs, cid + 1), run_cfg, cid,
                                          train=fed.client_data(cid), val=fed.client_val_data(cid))
    data = convert_data_mode(StandaloneDataDict(datadict, config), config)
    spec = {"run": to_dict(run_cfg), "num_labels": run_cfg.model.num_labels or fed.num_labels}
    setattr(config.model, BACKBONE_KEY, json.dumps(spec))
    return data, config


def _client_cfg(config: Any, client_cfgs: Any, client_id: int) -> Any:
    if client_cfgs is None or client_cfgs.get(f"client_{client_id}") is None:
        return config
    cfg = config.clone()
    cfg.merge_from_other_cfg(client_cfgs.get(f"client_{client_id}"))
    return cfg


def build_fs_model(model_config: Any, input_shape: Any = None) -> nn.Module | None:
    """FederatedScope model builder: the simulator's backbone for ``<type>@fs_gmfl_llm`` (``None`` otherwise)."""
    if not is_sim_model(str(model_config.type)):
        return None
    spec_text = model_config.get(BACKBONE_KEY, "")
    if not spec_text:
        raise InputError(f"model.type '{model_config.type}' is built from an fs_gmfl dataset's spec; set data.type "
                         "to an fs_gmfl dataset and federate.method to an fs_gmfl method")
    spec = json.loads(spec_text)
    run_cfg = build(RunConfig, spec["run"])
    return AdapterModel(build_backbone(run_cfg, int(spec["num_labels"])).model)


def model_provider_for(fs_cfg: Any, run_cfg: RunConfig) -> Callable[..., nn.Module]:
    """Host callback for methods that train a differently shaped adapter (``provider(r=4, lora_alpha=8)``).

    Models are cached per set of overrides, so each shape is built once per process.
    """
    cache: dict[tuple[tuple[str, Any], ...], nn.Module] = {}

    def provide(**overrides: Any) -> nn.Module:
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            cache[key] = _build_with_adapter(fs_cfg, run_cfg, overrides)
        return cache[key]

    return provide


def _build_with_adapter(fs_cfg: Any, run_cfg: RunConfig, overrides: dict[str, Any]) -> nn.Module:
    """A model with adapter overrides, in the dtype the clients train in (half with ``train.is_enable_half``)."""
    if is_sim_model(str(fs_cfg.model.type)):
        spec = json.loads(fs_cfg.model.get(BACKBONE_KEY, "") or "{}")
        variant = copy.deepcopy(run_cfg)  # the run's backbone with another adapter shape: not a run to re-check
        for key, value in overrides.items():
            setattr(variant.lora, key, value)
        model = build_backbone(variant, int(spec.get("num_labels", 2))).model
    else:
        from federatedscope.llm.model.model_builder import get_llm

        cfg = fs_cfg.clone()
        cfg.defrost()
        cfg.llm.adapter.args[0].update(overrides)
        model = get_llm(cfg).model
    return model.half() if trains_in_half(fs_cfg) else model


def trains_in_half(fs_cfg: Any) -> bool:
    """Whether FederatedScope's LLM trainer casts the clients' models to float16 (``train.is_enable_half``;
    DeepSpeed, which fs_gmfl runs refuse, would manage precision itself)."""
    return bool(fs_cfg.train.get("is_enable_half", False)) and not bool(fs_cfg.llm.deepspeed.get("use", False))
