"""TEMPORARY stub (replaced by the llm-assets branch): FederatedScope-LLM instruction records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fs_gmfl.errors import InputError


@dataclass(frozen=True)
class InstructionRow:
    instruction: str
    input: str
    output: str
    category: str


@dataclass
class InstructionSet:
    name: str
    rows: list[InstructionRow]
    source: str


def is_instruction_data(data_type: str) -> bool:
    return data_type.endswith((".json@llm", ".jsonl@llm"))


def read_instruction_set(data_type: str, root: str) -> InstructionSet:
    name = data_type.split("@")[0]
    path = Path(name) if Path(name).is_absolute() else Path(root) / name
    if not path.is_file():
        raise InputError(f"data file '{path}' not found")
    text = path.read_text(encoding="utf-8")
    records = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    rows = [InstructionRow(r["instruction"], r.get("input", "") or "", r["output"], r.get("category", "") or "")
            for r in records]
    return InstructionSet(path.stem, rows, str(path))
