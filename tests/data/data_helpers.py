"""Helpers shared by the data tests: one multi-turn conversation written in every format."""

from __future__ import annotations

import copy
import json
from pathlib import Path

SYSTEM, Q1, A1, Q2, A2 = "You are terse.", "What is 2+2?", "4.", "And 3+3?", "6, of course."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2}, {"role": "assistant", "content": A2},
]
RECORDS = {
    "prompt_response": {"system": SYSTEM, "history": [[Q1, A1]], "prompt": Q2, "response": A2},
    "alpaca": {"system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2, "input": "", "output": A2},
    "sharegpt": {"system": SYSTEM, "conversations": [
        {"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
        {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]},
    "messages": {"messages": CONVERSATION},
}


def fresh(tokenizer):
    """A private copy: tests install templates, and the session tokenizer is shared with other tests."""
    return copy.deepcopy(tokenizer)


def write_jsonl(path: Path, records: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    """Write records one per line; `raw_lines` puts raw bytes at given 0-based positions."""
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    for position, raw in sorted((raw_lines or {}).items()):
        lines.insert(position, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def trained_text(tokenizer, example: dict) -> str:
    ids = [i for i, label in zip(example["input_ids"], example["labels"]) if label != -100]
    return tokenizer.decode(ids, skip_special_tokens=False)


def trained_spans(example: dict) -> list[tuple[int, int]]:
    spans, start = [], None
    for position, label in enumerate(example["labels"] + [-100]):
        if label != -100 and start is None:
            start = position
        elif label == -100 and start is not None:
            spans.append((start, position))
            start = None
    return spans
