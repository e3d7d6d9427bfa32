"""Reading a `lorafit eval --prompts` file: prompts with the checks their answers must pass.

The record shape is `lorafit generate`'s input (`lorafit.infer.batch.messages_from_record`) plus
`"group"` and the checks described in `lorafit.evaluate.checks`. The whole file is read before a
model loads; every bad line is reported as `path:line: reason` and nothing is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafit.data.errors import BadRecordsError, DataConfigError
from lorafit.data.json_records import parse_json, unusable_value
from lorafit.evaluate.checks import Check, checks_from_record
from lorafit.infer.batch import messages_from_record

DEFAULT_GROUP = "all"


@dataclass(frozen=True)
class EvalPrompt:
    source: str  # "path:line"
    prompt: str  # the last user message, for tables
    messages: tuple  # the conversation to answer, as {"role", "content"} dicts
    group: str
    checks: tuple[Check, ...]


def prompt_from_record(record, source: str) -> EvalPrompt:
    messages = messages_from_record(record)  # ValueError names the problem
    group = record.get("group", DEFAULT_GROUP)
    if not isinstance(group, str) or not group.strip():
        raise ValueError('"group" must be a non-empty string')
    return EvalPrompt(source, messages[-1]["content"], tuple(messages), group.strip(), checks_from_record(record))


def read_eval_prompts(path: str | Path, flag: str = "--prompts") -> list[EvalPrompt]:
    """Every prompt of a JSONL file, or a `BadRecordsError` listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataConfigError(f"{flag} {path}: no such file")
    prompts, problems = [], []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            source = f"{path}:{number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
                if not text:
                    continue
                record, problem = parse_json(text)
                if problem is not None:
                    problems.append((source, problem.reason(with_line=False)))
                    continue
                reason = unusable_value(record)
                if reason is not None:
                    problems.append((source, reason))
                    continue
                prompts.append(prompt_from_record(record, source))
            except UnicodeDecodeError:
                problems.append((source, "not valid UTF-8"))
            except ValueError as error:
                problems.append((source, str(error)))
    if problems:
        raise BadRecordsError(problems)
    if not prompts:
        raise DataConfigError(f"{flag} {path}: the file holds no prompts")
    return prompts
