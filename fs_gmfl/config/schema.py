"""The run configuration: FederatedScope's YAML layout plus the method subtrees.

Keys follow FederatedScope (``federate.*``, ``data.*``, ``model.*``,
``llm.adapter.*``, ``dataloader.*``, ``train.*``, ``grad.*``, ``eval.*``,
``seed``, ``outdir``, ``expname``) so one YAML file drives both the embedded
simulator and the FederatedScope host. Method subtrees are the algorithm
cores' own config dataclasses: ``gmfl`` here, and one per registered method
that declares one (:attr:`~fs_gmfl.core.registry.MethodSpec.config_section`),
added when this module is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fs_gmfl.config.fault_tolerance import FaultToleranceConfig
from fs_gmfl.config.flower import FlowerConfig
from fs_gmfl.config.faults import FaultsConfig
from fs_gmfl.config.fields import fail, opt
from fs_gmfl.core.gmfl.config import GMFLConfig
from fs_gmfl.core.registry import MethodNames, canonical_name, gmfl_bases, method_specs, methods_where, spec_of
from fs_gmfl.core.uplinks import DEFAULT_MAX_SAMPLES, DEFAULT_MAX_UPDATE_RATIO, DEFAULT_UPDATE_RMS_FLOOR

#: every ``federate.method`` value (names and aliases of the registered methods, :mod:`fs_gmfl.core.registry`).
METHODS = MethodNames()
#: packaged instruction datasets (causal-LM instruction tuning; rows read by ``fs_gmfl.hosts.common.instructions``).
PACKAGED_INSTRUCTION_DATA = ("evals_math", "chatterbot_en")


def is_instruction_data_type(data_type: str) -> bool:
    """True for instruction data: a packaged instruction set or any FederatedScope-LLM ``<name>@llm`` type."""
    return data_type in PACKAGED_INSTRUCTION_DATA or data_type.endswith("@llm")


#: longest ``expname`` in UTF-8 bytes (file systems allow 255 per name; outputs add suffixes such as ``.tmp``).
MAX_EXPNAME_BYTES = 200
CLIENT_WEIGHTS = ("shard_size", "processed_samples")

#: FederatedScope-only settings the embedded simulator accepts and ignores (with a one-time notice), so one YAML
#: file can drive both hosts (``fs-gmfl run`` and ``fs-gmfl fs-run``). They configure FederatedScope's runtime
#: (trainer class, checkpoints, logging, gRPC, evaluation bookkeeping) and nothing the simulator would compute
#: differently; any other unknown key still fails.
HOST_ONLY_SECTIONS = ("trainer", "criterion", "early_stop", "distribute", "wandb", "backend", "verbose",
                      "print_decimal_digits", "check_completeness", "expname_tag", "cfg_file")
HOST_ONLY_KEYS = ("federate.share_local_model", "federate.make_global_eval", "federate.save_to",
                  "federate.online_aggr",
                  "federate.restore_from", "eval.count_flops",
                  "eval.best_res_update_round_wise_key", "eval.report", "llm.cache", "llm.chat",
                  "llm.retry_on_nan_loss", "llm.adapter.mv_to_cpu", "dataloader.num_workers")


@dataclass
class FederateConfig:
    """``federate.*``: the federation."""

    mode: str = opt("standalone", "'standalone' runs in one process; 'distributed' runs through the "
                    "FederatedScope host over gRPC.", choices=("standalone", "distributed"))
    method: str = opt("fedit", "Federated method; 'fedavg' is an alias of 'fedit' (FedAvg of LoRA factors).",
                      choices=METHODS)
    client_num: int = opt(10, "Number of clients.", ge=1)
    sample_client_num: int = opt(-1, "Clients sampled per round; -1 uses sample_client_rate (both -1: all).",
                                 ge=-1)
    sample_client_rate: float = opt(-1.0, "Fraction of clients sampled per round when sample_client_num is -1.",
                                    ge=-1.0, le=1.0)
    total_round_num: int = opt(10, "Number of communication rounds.", ge=1)
    save_freq: int = opt(0, "Rounds between checkpoints of the run (<run_dir>/checkpoint, resumed with "
                         "'fs-gmfl run --cfg F --resume'); the last round is always saved; 0 or -1: none.", ge=-1)
    max_sample_count: int = opt(DEFAULT_MAX_SAMPLES, "Largest sample count the server accepts from a client whose "
                                "shard size it does not know (the simulator also caps it at the shard size); a "
                                "larger count rejects the update.", ge=1)
    max_update_ratio: float = opt(DEFAULT_MAX_UPDATE_RATIO, "Update-norm bound: an uploaded tensor whose change "
                                  "||u - g|| exceeds this times max(||g||, federate.update_rms_floor * sqrt(numel)) "
                                  "is rejected (RELIABILITY.md); 0 turns the bound off.", ge=0.0)
    update_rms_floor: float = opt(DEFAULT_UPDATE_RMS_FLOOR, "Per-entry RMS floor of the update-norm bound, so a "
                                  "tensor whose global value is 0 (LoRA B at the start) can still be updated.",
                                  gt=0.0)
    max_rejected_rounds: int = opt(3, "Embedded simulator: stop the run (outputs written, exit status 1) after this "
                                   "many rounds in a row in which every client update that arrived was rejected, so "
                                   "the global model stopped moving (rounds without replies are skipped); each such "
                                   "round is logged and listed in summary.json (rejected_updates."
                                   "all_rejected_rounds); 0: never stop.", ge=0)
    client_weight: str = opt(
        "shard_size", "FedAvg weight of a client under fedit/fedavg/ffa_lora (+GMFL): 'shard_size' (its whole "
        "training shard |D|) or 'processed_samples' (min(dataloader.batch_size x train.local_update_steps, |D|), "
        "the GMFL reference code's |D_k|; |D| under train.batch_or_epoch 'epoch').",
        choices=CLIENT_WEIGHTS, inferred=True)

    def __post_init__(self) -> None:
        if self.sample_client_num == 0:
            fail(self, "sample_client_num", 0, "-1 or an integer in [1, federate.client_num]")
        if self.sample_client_num > self.client_num:
            fail(self, "sample_client_num", self.sample_client_num,
                 f"at most federate.client_num ({self.client_num})")
        if self.sample_client_rate != -1.0 and not 0.0 < self.sample_client_rate <= 1.0:
            fail(self, "sample_client_rate", self.sample_client_rate, "-1 or a number in (0, 1]")

    def clients_per_round(self) -> int:
        """Resolved number of sampled clients per round."""
        if self.sample_client_num > 0:
            return self.sample_client_num
        if self.sample_client_rate > 0:
            return max(1, int(round(self.sample_client_rate * self.client_num)))
        return self.client_num


@dataclass
class DataConfig:
    """``data.*``: dataset, held-out splits and the client partition."""

    root: str = opt("data", "Directory searched first for dataset files (then $FS_GMFL_DATA and installed "
                    "packages).")
    type: str = opt("rotten_tomatoes", "Dataset: rotten_tomatoes, rotten_tomatoes_full, news_articles, "
                    "health_tweets, synthetic, or csv:<path> / jsonl:<path> with 'text' and 'label' fields "
                    "(classification); evals_math, chatterbot_en, or a FederatedScope-LLM '<file>.jsonl@llm' / "
                    "'<file>.json@llm' under data.root (instruction tuning, model.task causal_lm).")
    splits: list[float] = opt(factory=lambda: [0.8, 0.1, 0.1], help="Train/val/test fractions of the pooled "
                              "data; train is partitioned over clients, val/test are held by the server.",
                              ge=0.0, le=1.0)
    splitter: str = opt("iid", "Client partition: 'iid', 'lda' (Dirichlet over labels; over categories for "
                        "instruction data) or 'meta' (one category -- or class -- per client, FederatedScope's meta splitter).",
                        choices=("iid", "lda", "meta"))
    splitter_args: list[dict[str, Any]] = opt(factory=list, help="Splitter arguments, FederatedScope style: "
                                              "[{alpha: 0.5}] for lda (min_size optional).")
    subsample: float = opt(1.0, "Fraction of the dataset used (after a seeded shuffle).", gt=0.0, le=1.0)
    client_val_fraction: float = opt(0.0, "Fraction of each client's shard held out as its local validation set "
                                     "(used by personalised evaluation); 0 keeps every example for training.",
                                     ge=0.0, lt=1.0)
    max_text_chars: int = opt(2000, "Texts are cut to this many characters before tokenisation.", ge=1)
    synthetic_num_samples: int = opt(600, "Size of the 'synthetic' dataset.", ge=10)
    synthetic_num_classes: int = opt(2, "Classes of the 'synthetic' dataset.", ge=2)

    def __post_init__(self) -> None:
        if len(self.splits) != 3 or abs(sum(self.splits) - 1.0) > 1e-6 or self.splits[0] <= 0:
            fail(self, "splits", self.splits, "three fractions [train, val, test] summing to 1 with train > 0")
        args = self.splitter_args[0] if self.splitter_args else {}
        if len(self.splitter_args) > 1:
            fail(self, "splitter_args", self.splitter_args, "a list with at most one mapping")
        allowed = {"iid": set(), "meta": set(), "lda": {"alpha", "min_size"}}[self.splitter]
        extra = set(args) - allowed
        if extra:
            fail(self, "splitter_args", self.splitter_args,
                 f"keys {sorted(allowed) or 'none'} for splitter '{self.splitter}'")
        if self.splitter == "lda":
            alpha = args.get("alpha", 0.5)
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
                fail(self, "splitter_args", self.splitter_args, "alpha a number > 0")
            min_size = args.get("min_size", 1)
            if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
                fail(self, "splitter_args", self.splitter_args, "min_size an integer >= 1")

    def lda_alpha(self) -> float:
        """Dirichlet concentration of the lda splitter."""
        return float((self.splitter_args[0] if self.splitter_args else {}).get("alpha", 0.5))

    def lda_min_size(self) -> int:
        """Smallest client shard the lda splitter accepts."""
        return int((self.splitter_args[0] if self.splitter_args else {}).get("min_size", 1))


@dataclass
class ModelConfig:
    """``model.*``: the backbone."""

    type: str = opt("minilm", "Backbone: 'minilm' (pre-trained all-MiniLM-L6-v2), 'tiny_bert', 'tiny_gpt2', "
                    "'tiny_llama' (random, from a config), a local model directory, or a shape preset "
                    "('gpt2-large', 'llama-7b', 'roberta-base'; 'fs-gmfl comm' only). A FederatedScope "
                    "'@huggingface_llm' suffix is accepted.")
    task: str = opt("auto", "'seq_cls' (sequence classification with a trained head), 'causal_lm' (instruction "
                    "tuning: loss on response tokens, generation-based evaluation; classification data become "
                    "'answer with the label name' rows) or 'auto' (causal_lm for instruction data, else seq_cls).",
                    choices=("auto", "seq_cls", "causal_lm"))
    num_labels: int = opt(0, "Classes of the head; 0 takes the dataset's.", ge=0)
    hidden_size: int = opt(32, "Hidden size of tiny_* models.", ge=4)
    num_layers: int = opt(2, "Layers of tiny_* models.", ge=1)
    num_heads: int = opt(2, "Attention heads of tiny_* models.", ge=1)
    vocab_size: int = opt(1000, "Vocabulary of tiny_* models (hash tokenizer).", ge=16)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            fail(self, "num_heads", self.num_heads, f"a divisor of model.hidden_size ({self.hidden_size})")


@dataclass
class LoraArgs:
    """One entry of ``llm.adapter.args`` (FederatedScope passes it to peft's LoraConfig)."""

    adapter_package: str = opt("peft", "Adapter library.", choices=("peft",))
    adapter_method: str = opt("lora", "Adapter method.", choices=("lora",))
    r: int = opt(8, "LoRA rank.", ge=1)
    lora_alpha: float = opt(16.0, "LoRA alpha (scaling alpha / r).", gt=0.0)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch.", ge=0.0, lt=1.0)
    target_modules: list[str] = opt(factory=list, help="Modules to adapt; empty picks peft's default for the "
                                    "architecture (bert: query,value; gpt2: c_attn; llama: q_proj,v_proj).")
    bias: str = opt("none", "LoRA bias mode.", choices=("none",))
    init_lora_weights: str = opt("default", "'default' (A Kaiming-uniform, B zero) or 'gaussian'.",
                                 choices=("default", "gaussian"))


@dataclass
class AdapterConfig:
    """``llm.adapter.*``."""

    use: bool = opt(True, "Use an adapter (required by the LoRA methods).")
    args: list[LoraArgs] = opt(factory=lambda: [LoraArgs()], help="A one-element list of LoRA arguments.")

    def __post_init__(self) -> None:
        if len(self.args) != 1:
            fail(self, "args", f"<{len(self.args)} entries>", "exactly one adapter entry")


@dataclass
class LLMConfig:
    """``llm.*``."""

    tok_len: int = opt(128, "Maximum tokens per example.", ge=4)
    min_response_fraction: float = opt(0.25, "Instruction data: when prompt + response exceed tok_len, the "
                                       "response keeps at least this fraction of tok_len (or all of it, if "
                                       "shorter) and the prompt is cut from the left; counts are reported.",
                                       gt=0.0, le=1.0, inferred=True)
    adapter: AdapterConfig = opt(factory=AdapterConfig, help="Adapter settings.")


@dataclass
class DataloaderConfig:
    """``dataloader.*``."""

    batch_size: int = opt(16, "Local training batch size.", ge=1)


@dataclass
class OptimizerConfig:
    """``train.optimizer.*``."""

    type: str = opt("AdamW", "Local optimizer.", choices=("AdamW", "Adam", "SGD"))
    lr: float = opt(1e-3, "Learning rate.", gt=0.0)
    weight_decay: float = opt(0.0, "Weight decay.", ge=0.0)
    momentum: float = opt(0.0, "SGD momentum.", ge=0.0, lt=1.0)


@dataclass
class SchedulerConfig:
    """``train.scheduler.*``."""

    type: str = opt("constant", "'constant'; 'cosine_rounds' (GMFL reference: lr decays over rounds to min_lr); "
                    "'cosine_steps' (cosine with warm-up inside each round).",
                    choices=("constant", "cosine_rounds", "cosine_steps"))
    warmup_ratio: float = opt(0.0, "Warm-up fraction of the steps for cosine_steps.", ge=0.0, lt=1.0)
    min_lr: float = opt(1e-6, "Final learning rate of the cosine schedules.", ge=0.0)


@dataclass
class TrainConfig:
    """``train.*``: local training."""

    local_update_steps: int = opt(10, "Local steps (batch mode) or epochs (epoch mode) per round.", ge=1)
    batch_or_epoch: str = opt("batch", "Unit of local_update_steps.", choices=("batch", "epoch"))
    optimizer: OptimizerConfig = opt(factory=OptimizerConfig, help="Optimizer.")
    scheduler: SchedulerConfig = opt(factory=SchedulerConfig, help="Learning-rate schedule.")
    is_enable_half: bool = opt(False, "FederatedScope's switch: keep the whole model (backbone and adapter) in "
                               "train.half_dtype; clients train and upload in that dtype.")
    half_dtype: str = opt("bfloat16", "Dtype of is_enable_half: 'bfloat16' (fast on CPUs with avx512_bf16 and on "
                          "GPUs) or 'float16' (FederatedScope's .half(); GPU only in practice).",
                          choices=("bfloat16", "float16"), inferred=True)
    autocast: str = opt("none", "Mixed precision with fp32 master weights and fp32 uplinks: 'bfloat16' autocast "
                        "(CPU and GPU), 'float16' autocast with dynamic loss scaling (GPU only: needs use_gpu) or "
                        "'none'.", choices=("none", "bfloat16", "float16"))
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass (less memory, more "
                                       "time).")


@dataclass
class GradConfig:
    """``grad.*``."""

    grad_clip: float = opt(-1.0, "Gradient-norm clipping; <= 0 disables it.")


@dataclass
class EvalConfig:
    """``eval.*``."""

    freq: int = opt(1, "Evaluate the global model every this many rounds (and after the last).", ge=1)
    metrics: list[str] = opt(factory=lambda: ["acc", "loss"], help="Metrics to report; for causal_lm 'acc' or "
                             "'exact_match' adds generation-based exact match, 'loss' the response-token loss, "
                             "average loss and perplexity.", choices=("acc", "loss", "exact_match"))
    split: list[str] = opt(factory=lambda: ["test"], help="Server-held splits to evaluate.",
                           choices=("val", "test"))
    batch_size: int = opt(64, "Evaluation batch size.", ge=1)
    max_new_tokens: int = opt(32, "causal_lm: greedy decoding stops after this many new tokens (or at EOS).",
                              ge=1)
    generation_rows: int = opt(0, "causal_lm: exact match is measured on this many rows of each split (a fixed "
                               "seeded subset; 0: all rows). Losses always use every row.", ge=0)


@dataclass
class _RunConfigBase:
    """The sections every run has; :data:`RunConfig` adds one section per method that declares one."""

    use_gpu: bool = opt(False, "Train on CUDA when available.")
    device: int = opt(-1, "CUDA device index (-1: default device).", ge=-1)
    seed: int = opt(0, "Seed of every random choice (data split, sampling, init, batches).", ge=0)
    outdir: str = opt("exp", "Output directory.")
    expname: str = opt("", "Run name; outputs go to <outdir>/<expname> (default: the method name).")
    federate: FederateConfig = opt(factory=FederateConfig, help="Federation.")
    data: DataConfig = opt(factory=DataConfig, help="Data.")
    model: ModelConfig = opt(factory=ModelConfig, help="Backbone.")
    llm: LLMConfig = opt(factory=LLMConfig, help="LLM and adapter.")
    dataloader: DataloaderConfig = opt(factory=DataloaderConfig, help="Data loader.")
    train: TrainConfig = opt(factory=TrainConfig, help="Local training.")
    grad: GradConfig = opt(factory=GradConfig, help="Gradients.")
    eval: EvalConfig = opt(factory=EvalConfig, help="Evaluation.")
    gmfl: GMFLConfig = opt(factory=GMFLConfig, help="GMFL global masking.")

    def __post_init__(self) -> None:
        self._resolve_task()
        self._check_output_names()
        spec, bases = spec_of(self.federate.method), gmfl_bases()
        if self.gmfl.use and not spec.gmfl_base:
            fail(self, "gmfl.use", True, spec.gmfl_refusal or f"only with federate.method in {bases} "
                 f"(got '{self.federate.method}')")
        if self.gmfl.use and self.gmfl.downlink == "stateful_sync" and not spec.gmfl_stateful_sync:
            fail(self, "gmfl.downlink", "stateful_sync", f"'stateless' with federate.method '{self.federate.method}' "
                 f"(only {methods_where('gmfl_stateful_sync')} clients cache the adapter; this method's downlinks "
                 "are rebuilt every round)")
        if self.federate.client_weight != "shard_size" and not spec.client_weighting:
            fail(self, "federate.client_weight", self.federate.client_weight,
                 f"'shard_size' with federate.method '{self.federate.method}' (the rule applies to "
                 f"{methods_where('client_weighting')})")
        if not self.llm.adapter.use:
            fail(self, "llm.adapter.use", False, f"True for federate.method '{self.federate.method}'")
        if spec.config_section is not None and not hasattr(self, spec.config_section):
            fail(self, "federate.method", self.federate.method, f"a method found before the schema was built: its "
                 f"section '{spec.config_section}' is missing (install it as an entry point)")
        check_method = spec.config_check()
        if check_method is not None:
            check_method(self)

    def _resolve_task(self) -> None:
        instruction = is_instruction_data_type(self.data.type)
        if self.model.task == "auto":
            self.model.task = "causal_lm" if instruction else "seq_cls"
        elif instruction and self.model.task == "seq_cls":
            fail(self, "model.task", "seq_cls", f"'causal_lm' or 'auto' for instruction data '{self.data.type}'")
        if self.train.is_enable_half and self.train.autocast != "none":
            fail(self, "train.autocast", self.train.autocast, "'none' with train.is_enable_half (the model is "
                 "already in half precision)")
        if self.train.is_enable_half and self.train.half_dtype == "float16" and \
                self.train.optimizer.type in ("Adam", "AdamW"):
            fail(self, "train.half_dtype", "float16", f"'bfloat16' with train.optimizer.type "
                 f"{self.train.optimizer.type} (its eps 1e-8 rounds to 0 in float16: the first step makes every "
                 "update NaN, and every update would be rejected), or train.optimizer.type SGD")
        if self.train.autocast == "float16" and not self.use_gpu:
            fail(self, "train.autocast", "float16", "'none' or 'bfloat16' without use_gpu: True (float16 autocast "
                 "with loss scaling is a GPU mode; CPUs compute float16 slowly)")
    def _check_output_names(self) -> None:
        """``expname`` names one directory inside ``outdir``: no separators, not absolute, a short file name."""
        name = self.expname
        if "\0" in self.outdir or not self.outdir.strip():
            fail(self, "outdir", self.outdir, "a non-empty directory path without NUL characters")
        if name and (name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip()):
            fail(self, "expname", name, "one directory name inside outdir: no '/', '\\', NUL, leading or "
                 "trailing spaces, not '.' or '..' (put directories into outdir)")
        if len(name.encode("utf-8", "surrogatepass")) > MAX_EXPNAME_BYTES:
            fail(self, "expname", f"<{len(name)} characters>", f"at most {MAX_EXPNAME_BYTES} bytes (a file name "
                 "must fit the file system's 255-byte limit with room for suffixes)")

    @property
    def lora(self) -> LoraArgs:
        """The single LoRA argument entry."""
        return self.llm.adapter.args[0]

    @property
    def method(self) -> str:
        """The registered method's name (an alias such as ``fedavg`` resolved)."""
        return canonical_name(self.federate.method)

    @property
    def run_name(self) -> str:
        """``expname`` or a name derived from the method."""
        if self.expname:
            return self.expname
        return self.method + ("_gmfl" if self.gmfl.use else "")


def _build_run_config() -> type:
    """``RunConfig``: the common sections, one section per registered method that declares one, then ``faults``,
    ``fault_tolerance`` and ``flower``."""
    sections = [(spec.config_section, spec.config_class,
                 opt(factory=spec.config_class, help=f"{spec.summary} (federate.method: {spec.name})."))
                for spec in method_specs() if spec.config_section is not None]
    faults = ("faults", FaultsConfig, opt(factory=FaultsConfig, help="Simulated client dropout and stragglers "
                                          "(embedded simulator only)."))
    tolerance = ("fault_tolerance", FaultToleranceConfig,
                 opt(factory=FaultToleranceConfig, help="Deadlines and quorum of a distributed run (FederatedScope "
                     "gRPC mode): a dead, late or restarted participant costs a round's reply, never a hang."))
    flower = ("flower", FlowerConfig, opt(factory=FlowerConfig, help="Parallelism, resources and deadlines of the "
                                          "Flower host (fs-gmfl flower-run, flwr run)."))
    cls = dataclasses.make_dataclass("RunConfig", [*sections, faults, tolerance, flower], bases=(_RunConfigBase,))
    cls.__module__ = __name__
    cls.__doc__ = ("A whole run: FederatedScope keys, one subtree per method (``gmfl``, ``hafl``, ...), ``faults``, "
                   "``fault_tolerance`` and ``flower``.")
    return cls


RunConfig = _build_run_config()
