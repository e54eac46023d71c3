"""Resource pre-flight: refuse, before anything is allocated, a run that cannot fit the machine.

:func:`check_run` is called by the embedded simulator before the tokenizer,
data and model are loaded. It refuses with one line
(:class:`~fs_gmfl.errors.ConfigError` naming the key and the estimate):

* a model directory that is not usable (see :func:`check_model_dir`);
* ``model.task: causal_lm`` on an encoder-only backbone such as BERT (see
  :func:`~fs_gmfl.hosts.common.models.check_decoder_for_causal_lm`);
* ``llm.tok_len`` (plus ``eval.max_new_tokens`` where answers are decoded)
  above the pre-trained model's ``max_position_embeddings``;
* a LoRA rank ``llm.adapter.args[0].r`` above ``min(d_in, d_out)`` of a
  targeted module (read from the model built on the meta device, so no
  weight exists yet);
* an estimated peak memory above the memory available (see
  :func:`estimate_bytes`, :func:`available_bytes`).

The estimate is a deliberately simple lower bound of float32 training memory
(weights; gradients and two Adam moments of what is trained; the activations
of one training batch kept for backward; one evaluation batch's attention;
the KV cache of one batch of greedy answers; the tokenised dataset), so a refusal means the run could certainly not fit;
a run that passes may still be tight. ``FS_GMFL_MEMORY_BYTES`` sets the memory
budget explicitly (bytes) instead of reading ``MemAvailable`` from
``/proc/meminfo`` (bounded by the cgroup limit, if any).

Once every check has passed, the settings that are valid but quietly do less
than they seem to are logged as warnings (:mod:`fs_gmfl.config.advice`) and
returned for ``summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fs_gmfl.config.advice import log_config_warnings
from fs_gmfl.config.environment import MEMORY_BYTES
from fs_gmfl.config.schema import RunConfig
from fs_gmfl.core.registry import spec_of
from fs_gmfl.errors import ConfigError

FLOAT_BYTES = 4
#: weight file names a transformers model directory may hold (one of them, or a sharded index).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
#: activations saved for backward per token, layer and hidden unit (attention projections, MLP, norms, dropout).
ACTIVATION_FACTOR = 16
#: randomly initialised backbones sized by ``model.*``.
TINY = ("tiny_bert", "tiny_gpt2", "tiny_llama")


@dataclass
class Term:
    """One part of the memory estimate, blamed on the key that controls it."""

    key: str
    value: Any
    nbytes: float
    what: str


def human(nbytes: float) -> str:
    """``1.5 GiB`` style."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(nbytes) < 1024 or unit == "PiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} PiB"  # pragma: no cover


# -- the machine --------------------------------------------------------------------------------------------
def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def available_bytes() -> int | None:
    """Memory this run may use: ``$FS_GMFL_MEMORY_BYTES``, else MemAvailable bounded by the cgroup limit."""
    explicit = MEMORY_BYTES.read()
    if explicit is not None:
        return explicit
    found = [b for b in (_meminfo_available(), _cgroup_limit()) if b is not None]
    return min(found) if found else None


# -- the model's shape without loading it ------------------------------------------------------------------
@dataclass
class Shape:
    """The dimensions the estimate needs."""

    hidden: int
    layers: int
    heads: int
    vocab: int
    intermediate: int
    positions: int | None  # learned position embeddings (None: rotary, or unknown)
    max_positions: int | None  # the longest sequence a pre-trained model accepts (None: no limit known)


def check_model_dir(path: Path, key: str = "model.type") -> dict[str, Any]:
    """The parsed ``config.json`` of a local model directory; refuse a directory that cannot be loaded.

    Raises:
        ConfigError: ``config.json`` is not a JSON object with ``model_type``,
            or the directory holds no weights (``model.safetensors``,
            ``pytorch_model.bin`` or a sharded index).
    """
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(key, str(path), f"a model directory whose config.json is valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(key, str(path), "a model directory whose config.json is an object with 'model_type'")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(key, str(path), f"a model directory with weights (one of {', '.join(WEIGHT_FILES)}); "
                          "none found")
    return config


def _int(config: dict[str, Any], *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def shape_of(cfg: RunConfig, config: dict[str, Any] | None) -> Shape:
    """Dimensions of the backbone: from ``config.json`` for a model directory, from ``model.*`` for tiny types."""
    if config is None:
        m = cfg.model
        learned = cfg.model.type.split("@")[0] in TINY[:2]
        return Shape(m.hidden_size, m.num_layers, m.num_heads, m.vocab_size, 2 * m.hidden_size,
                     max(512, cfg.llm.tok_len) if learned else None, None)
    hidden = _int(config, "hidden_size", "n_embd", "d_model", default=768) or 768
    max_pos = _int(config, "max_position_embeddings", "n_positions", "n_ctx")
    return Shape(hidden, _int(config, "num_hidden_layers", "n_layer", default=12) or 12,
                 _int(config, "num_attention_heads", "n_head", default=12) or 12,
                 _int(config, "vocab_size", default=32000) or 32000,
                 _int(config, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden,
                 max_pos, max_pos)


# -- the estimate -------------------------------------------------------------------------------------------
def estimate_bytes(cfg: RunConfig, shape: Shape, *, lora_elements: int = 0, rows: int | None = None) -> list[Term]:
    """The parts of the peak-memory lower bound, each blamed on its key (see the module docstring)."""
    tok, h, layers = cfg.llm.tok_len, shape.hidden, shape.layers
    batch = cfg.dataloader.batch_size if rows is None else min(cfg.dataloader.batch_size, rows)
    eval_batch = cfg.eval.batch_size if rows is None else min(cfg.eval.batch_size, rows)
    block = 4 * h * h + 2 * h * shape.intermediate
    full = spec_of(cfg.method).trains_backbone  # full weight matrices trained, with optimizer state
    tiny = cfg.model.type.split("@")[0] in TINY
    terms = [Term("model.vocab_size" if tiny else "model.type", cfg.model.vocab_size if tiny else cfg.model.type,
                  shape.vocab * h * FLOAT_BYTES, "token embeddings"),
             Term("model.hidden_size" if tiny else "model.type", cfg.model.hidden_size if tiny else cfg.model.type,
                  layers * block * FLOAT_BYTES * (4 if full else 1),
                  "transformer blocks" + (" with gradients and Adam moments" if full else ""))]
    if shape.positions:
        terms.append(Term("llm.tok_len", tok, shape.positions * h * FLOAT_BYTES * (4 if full else 1),
                          f"position embeddings for {shape.positions} positions"))
    terms.append(Term("llm.adapter.args[0].r", cfg.lora.r, lora_elements * FLOAT_BYTES * 4,
                      "LoRA factors with gradients and Adam moments"))
    terms.append(Term("dataloader.batch_size", cfg.dataloader.batch_size,
                      batch * tok * h * layers * ACTIVATION_FACTOR * FLOAT_BYTES,
                      f"activations of a {batch} x {tok}-token training batch"))
    terms.append(Term(*_blame("dataloader.batch_size", cfg.dataloader.batch_size, batch, tok),
                      2 * batch * shape.heads * tok * tok * layers * FLOAT_BYTES,
                      f"attention scores of a {batch} x {tok}-token training batch"))
    if cfg.model.task == "causal_lm":
        terms.append(Term("dataloader.batch_size", cfg.dataloader.batch_size, 2 * batch * tok * shape.vocab
                          * FLOAT_BYTES, f"logits and their gradients of a {batch} x {tok}-token training batch"))
    terms.append(Term(*_blame("eval.batch_size", cfg.eval.batch_size, eval_batch, tok),
                      2 * eval_batch * shape.heads * tok * tok * FLOAT_BYTES + eval_batch * tok * shape.vocab
                      * FLOAT_BYTES * (cfg.model.task == "causal_lm"),
                      f"attention scores of a {eval_batch} x {tok}-token evaluation batch"))
    if generates(cfg):
        longest = tok + cfg.eval.max_new_tokens
        terms.append(Term("eval.max_new_tokens", cfg.eval.max_new_tokens,
                          2 * eval_batch * layers * longest * h * FLOAT_BYTES,
                          f"the KV cache of {eval_batch} greedy answers of up to {longest} tokens"))
    if rows is not None:
        terms.append(Term(*(("llm.tok_len", tok) if tok > rows else ("data.synthetic_num_samples", rows)),
                          rows * tok * 8 * 3, f"{rows} tokenised examples of {tok} tokens"))
    return terms


def _blame(batch_key: str, batch_value: int, batch: int, tok: int) -> tuple[str, int]:
    """The key to name for a ``batch x tok^2`` term: the factor that is out of proportion."""
    return ("llm.tok_len", tok) if tok >= batch else (batch_key, batch_value)


def refuse_if_too_big(terms: list[Term], budget: int | None) -> None:
    """Raise :class:`ConfigError` naming the largest part's key when the total exceeds ``budget``."""
    if budget is None:
        return
    total = sum(t.nbytes for t in terms)
    if total <= budget:
        return
    worst = max(terms, key=lambda t: t.nbytes)
    raise ConfigError(worst.key, worst.value, f"the run needs an estimated {human(total)} of memory ({worst.what}: "
                      f"{human(worst.nbytes)}) but {human(budget)} is available; lower {worst.key}")


# -- the checks ---------------------------------------------------------------------------------------------
def generates(cfg: RunConfig) -> bool:
    """Whether evaluation decodes answers (a causal LM scored by exact match)."""
    return cfg.model.task == "causal_lm" and bool(set(cfg.eval.metrics) & {"acc", "exact_match"})


def check_sequence_length(cfg: RunConfig, shape: Shape) -> None:
    """``llm.tok_len`` (plus ``eval.max_new_tokens`` when answers are decoded) must fit a pre-trained model's
    position table."""
    limit = shape.max_positions
    if limit is not None and cfg.llm.tok_len > limit:
        raise ConfigError("llm.tok_len", cfg.llm.tok_len, f"at most the model's max_position_embeddings ({limit})")
    if limit is not None and generates(cfg) and cfg.llm.tok_len + cfg.eval.max_new_tokens > limit:
        raise ConfigError("eval.max_new_tokens", cfg.eval.max_new_tokens, f"at most {limit - cfg.llm.tok_len} "
                          f"(llm.tok_len {cfg.llm.tok_len} plus the answer must fit the model's "
                          f"max_position_embeddings, {limit})")


def lora_target_dims(cfg: RunConfig) -> list[tuple[str, int, int]]:
    """``(module name, d_in, d_out)`` of every module the LoRA adapter targets, from a meta-device backbone."""
    import torch

    from fs_gmfl.hosts.common.models import _load_base, resolve_target_modules

    try:
        base, _ = _load_base(cfg, 2, meta=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError("model.type", cfg.model.type, f"a model transformers can build ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    targets = resolve_target_modules(base, cfg.lora.target_modules)
    dims = []
    for name, module in base.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            d_out, d_in = weight.shape if type(module).__name__ != "Conv1D" else weight.shape[::-1]
            dims.append((name, int(d_in), int(d_out)))
    return dims


def check_lora_rank(cfg: RunConfig, dims: list[tuple[str, int, int]]) -> None:
    """``llm.adapter.args[0].r`` must not exceed ``min(d_in, d_out)`` of any targeted module."""
    if not dims:
        return
    name, d_in, d_out = min(dims, key=lambda d: min(d[1], d[2]))
    limit = min(d_in, d_out)
    if cfg.lora.r > limit:
        raise ConfigError("llm.adapter.args[0].r", cfg.lora.r, f"at most min(d_in, d_out) = {limit} of the "
                          f"targeted module '{name}' ({d_in} -> {d_out}); a larger rank adds no capacity")


def check_run(cfg: RunConfig) -> list[str]:
    """All pre-flight checks of a simulator run (see the module docstring); the warnings it logged.

    Raises:
        ConfigError: the model directory is unusable, or a check fails; the
            message names the key and, for memory, the estimate.
    """
    from fs_gmfl.hosts.common.models import SHAPE_PRESETS, model_source

    if model_source(cfg.model.type) in SHAPE_PRESETS:
        return []  # no weights: the simulator refuses it when loading (it is for 'fs-gmfl comm' only)
    check_model(cfg)
    return log_config_warnings(cfg)


def check_model(cfg: RunConfig) -> None:
    """The backbone's checks: its directory, the task it is asked for, sequence length, LoRA rank and memory."""
    from fs_gmfl.hosts.common.models import TINY_TYPES, check_decoder_for_causal_lm, model_dir, model_source
    from fs_gmfl.hosts.common.models import tiny_config as tiny_model_config

    path = model_dir(cfg)
    config = check_model_dir(path) if path is not None else None
    check_decoder_for_causal_lm(cfg, config if config is not None
                                else tiny_model_config(cfg, TINY_TYPES[model_source(cfg.model.type)]).to_dict())
    shape = shape_of(cfg, config)
    check_sequence_length(cfg, shape)
    rows = cfg.data.synthetic_num_samples if cfg.data.type == "synthetic" else None
    budget = available_bytes()
    # without the adapter first: a huge tok_len or batch must not even build the meta model
    refuse_if_too_big(estimate_bytes(cfg, shape, rows=rows), budget)
    dims = lora_target_dims(cfg)  # every method builds the LoRA adapter (FFT and FedKRSO switch it off)
    check_lora_rank(cfg, dims)
    lora = sum(cfg.lora.r * (d_in + d_out) for _, d_in, d_out in dims)
    refuse_if_too_big(estimate_bytes(cfg, shape, lora_elements=lora, rows=rows), budget)

