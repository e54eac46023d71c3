"""``fs-gmfl bench perf --blocks llm``: an LLM's training throughput in the simulator, and each method's client memory.

* **throughput**: the simulator's rounds (``train_seconds``: local training,
  messages and aggregation) against a plain transformers + peft loop that
  trains the same model on the very same batches in the same order (replayed
  from the simulator's seeded client sampling and batch schedule), one AdamW
  over the trainable parameters, under the configuration's ``train.autocast``.
  Tokens/s counts the non-padding tokens of those batches. Interleaved
  ``--repeats`` times; medians.
* **memory**: per method (``fs-gmfl bench llm``'s methods; HAFL's weakest and
  strongest profiles; FedKRSO and federated full fine-tuning of the same
  modules), client 0's local training in a fresh process: the peak resident
  memory during training (reset after loading), the trained parameters, the
  bytes of the trainable tensors and of the optimizer state, the median step.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fs_gmfl.bench.client_cost import in_fresh_process, measure_client_cost
from fs_gmfl.bench.common import (interleaved, markdown_table, median_of, plain_adamw_seconds, progress,
                                  simulator_training)
from fs_gmfl.bench.llm import hafl_overrides, method_overrides
from fs_gmfl.config import RunConfig, load_config
from fs_gmfl.hosts.common.batches import batch_schedule, sample_clients
from fs_gmfl.hosts.sim.runner import Simulation
from fs_gmfl.plots import MIB

#: LoRA rank of the LLM configurations (``yaml_configs/llm/smollm2_fedit.yaml``): HAFL's profiles derive from it.
R_MAX = 8
#: evaluation off the clock and cheap: only the token loss of round 0, which every run computes.
QUIET_EVAL = ["eval.metrics", "[loss]", "eval.generation_rows", "0"]


def llm_config(args: argparse.Namespace, out: Path, name: str, *extra: str) -> RunConfig:
    """``--llm-cfg`` with ``--llm-rounds`` rounds, evaluation only at round 0 (outside the timed rounds)."""
    return load_config(args.llm_cfg, ["federate.total_round_num", str(args.llm_rounds),
                                      "eval.freq", str(args.llm_rounds + 1), *QUIET_EVAL,
                                      "outdir", str(out / "runs"), "expname", name,
                                      *[w for pair in args.llm_set for w in pair], *extra])


def replayed_batches(cfg: RunConfig, client_sizes: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
    """``(client, row indices)`` of every local step of rounds 1..R, in the simulator's order."""
    for rnd in range(1, cfg.federate.total_round_num + 1):
        for client in sample_clients(cfg.federate.client_num, cfg.federate.clients_per_round(), seed=cfg.seed,
                                     rnd=rnd):
            yield from ((client, index) for index in batch_schedule(client_sizes[client], cfg, rnd=rnd,
                                                                    client_id=client))


def plain_run(cfg: RunConfig) -> dict[str, Any]:
    """The same model trained by a bare transformers + peft loop on the simulator's batches; seconds, steps, tokens."""
    sim = Simulation(cfg, quiet=True, overwrite=True)
    sim.setup()
    data = sim.data
    sizes = [len(data.client_data(c)) for c in range(cfg.federate.client_num)]
    batches = [data.client_data(c).batch(index) for c, index in replayed_batches(cfg, sizes)]
    return {"seconds": plain_adamw_seconds(sim.model, cfg, batches), "steps": len(batches),
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
            "padded_tokens": sum(int(b["attention_mask"].numel()) for b in batches)}


def throughput_block(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Simulator vs plain loop on the same batches: tokens/s, medians of ``--repeats`` interleaved runs."""
    cfg = llm_config(args, out, "llm_sim")
    variants = {"simulator": lambda: simulator_training(cfg), "plain loop": lambda: plain_run(llm_config(args, out,
                                                                                                  "llm_plain"))}
    runs = interleaved(variants, args.repeats)
    plain = runs["plain loop"][0]
    if any(r["steps"] != plain["steps"] for r in runs["simulator"]):
        raise RuntimeError(f"the simulator took {runs['simulator'][0]['steps']} steps, the replay {plain['steps']}")
    medians = {name: median_of(rs, "seconds") for name, rs in runs.items()}
    return {"config": str(args.llm_cfg), "autocast": cfg.train.autocast, "rounds": args.llm_rounds,
            "steps": plain["steps"], "tokens": plain["tokens"], "padded_tokens": plain["padded_tokens"],
            "runs": runs, "median_s": medians,
            "tokens_per_s": {name: plain["tokens"] / s for name, s in medians.items()},
            "simulator_vs_plain_time": medians["simulator"] / medians["plain loop"]}


def memory_methods() -> dict[str, list[str]]:
    """Each method whose client memory is measured, as overrides of the LLM configuration."""
    lora = method_overrides(R_MAX, 2)
    single = {"ITALoRA r=2 (weakest profile)": ("truncation", "[{share: 1.0, rank: 2}]"),
              "ITALoRA r=8 (strongest)": ("truncation", "[{share: 1.0, rank: 8}]"),
              "IFALoRA n=2 of 8 (weakest)": ("freezing", "[{share: 1.0, freeze_ratio: 0.75}]"),
              "IFALoRA n=8 of 8 (strongest)": ("freezing", "[{share: 1.0, freeze_ratio: 0.0}]")}
    out = {m: lora[m] for m in ("FedIT", "FedIT+GMFL", "FFA-LoRA", "FedEx-LoRA", "LoRA-A2")}
    for label, (scheme, profile) in single.items():
        out[label] = [*hafl_overrides(scheme, R_MAX), "hafl.profiles", profile]
    same = "[q_proj, v_proj]"  # the LoRA configurations' targets
    out["FedKRSO (K 10, r 8, same modules)"] = ["federate.method", "fedkrso", "fedkrso.rank", str(R_MAX),
                                                "fedkrso.target_modules", same]
    out["FFT (same modules)"] = ["federate.method", "fft", "fft.target_modules", same]
    return out


def memory_block(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Client 0's training memory and step time per method, each in a fresh process."""
    steps = args.llm_warmup + args.llm_steps
    rows: dict[str, Any] = {}
    for label, words in memory_methods().items():
        progress(f"perf: client memory of {label} ({args.llm_warmup} + {args.llm_steps} steps, fresh process)")
        cfg = llm_config(args, out, "llm_memory", *words, "train.batch_or_epoch", "batch",
                         "train.local_update_steps", str(steps))
        rows[label] = in_fresh_process(measure_client_cost, cfg, args.llm_warmup)
    return rows


def llm_block(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Both parts of the block."""
    return {"throughput": throughput_block(args, out), "memory": memory_block(args, out)}


def llm_text(block: dict[str, Any]) -> str:
    """The block's two markdown tables."""
    t = block["throughput"]
    rows = [[name, f"{t['median_s'][name]:.2f} s", f"{t['tokens_per_s'][name]:.0f}",
             f"{t['median_s'][name] / t['median_s']['plain loop']:.3f}"] for name in ("simulator", "plain loop")]
    text = (f"llm throughput ({t['config']}, {t['rounds']} rounds, {t['steps']} steps on the same batches, "
            f"{t['tokens']:,} tokens ({t['padded_tokens']:,} with padding), autocast {t['autocast']}):\n\n")
    text += markdown_table(["variant", "median seconds", "tokens/s", "time vs plain loop"], rows)
    mem = block["memory"]
    text += "\n\nclient 0's local training per method (fresh process each; RSS peak reset after loading):\n\n"
    text += markdown_table(
        ["method", "trainable params", "trained params", "param + optimizer state MiB", "RSS before MiB",
         "peak RSS in training MiB", "growth MiB", "median step s"],
        [[label, f"{m['trainable_params']:,}", f"{m['trained_params']:,}",
          f"{(m['param_bytes'] + m['optimizer_state_bytes']) / MIB:.1f}", f"{m['rss_before_training_bytes'] / MIB:.0f}",
          f"{m['peak_rss_bytes'] / MIB:.0f}", f"{(m['peak_rss_bytes'] - m['rss_before_training_bytes']) / MIB:.0f}",
          f"{m['median_step_seconds']:.3f}"] for label, m in mem.items()])
    return text
