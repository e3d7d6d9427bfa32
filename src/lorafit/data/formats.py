"""Readers: data files -> conversations (`[{"role", "content"}]`), each with its source for errors.

A record's source is ``path:line`` in a JSON Lines file (1-based, counting blank lines) and
``path:#index`` in a JSON array (0-based); `json_records` reads the files (JSON Lines line by line,
so they may be larger than memory). Every reader yields either a `Conversation` or a `Rejection`
with a reason; nothing here raises for a bad record, so callers decide between stopping
(`--on_bad_record error`) and skipping. A record is bad when it is not UTF-8 or not JSON, holds
text that is not valid Unicode or nests too deeply (`json_records.unusable_value`), or when its
fields do not fit its format; the reason names the field and what was expected. With ``auto`` the
format is detected from a file's first good record; a record of another format later in the file
is reported as such (one format per file).

Formats (``--data_format``, ``auto`` detects per file):

* ``prompt_response``: ``{"prompt", "response", "history": [[q, a], ...], "system"?}`` (column names
  configurable);
* ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?}``, the input joined to the
  instruction with a blank line;
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation",
  "value"}], "system"?, "tools"?}``;
* ``messages``: OpenAI style ``{"messages": [{"role", "content"}], "tools"?}``.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lorafit.data.errors import BadRecordError, DataConfigError
from lorafit.data.json_records import Rejection, json_records, record_text, unusable_value

__all__ = ["Conversation", "FormatOptions", "Rejection", "read_records", "resolve_files", "detect_format"]

DATA_SUFFIXES = (".json", ".jsonl")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}
# OpenAI message keys passed through to the chat template besides role and content.
MESSAGE_EXTRA_KEYS = ("tool_calls", "name", "tool_call_id")
SHOWN_CHARS = 60  # the longest value or key list quoted in a reason


@dataclass
class Conversation:
    source: str
    messages: list[dict]
    tools: list | None = None


@dataclass(frozen=True)
class FormatOptions:
    data_format: str = "auto"
    prompt_column: str = "prompt"
    response_column: str = "response"
    history_column: str = "history"
    system_column: str = "system"

    @classmethod
    def from_args(cls, data_args) -> "FormatOptions":
        return cls(data_args.data_format, data_args.prompt_column, data_args.response_column,
                   data_args.history_column, data_args.system_column)


# ---- files ---------------------------------------------------------------------------------------

def resolve_files(patterns: list[str] | None, flag: str = "--train_file") -> list[str]:
    """Files, folders (their .json/.jsonl files, sorted) and globs -> an ordered list of files."""
    files: list[str] = []
    for pattern in patterns or []:
        path = Path(os.path.expanduser(pattern))
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
            if not found:
                raise DataConfigError(f"{flag} {pattern}: the folder holds no .json or .jsonl file")
        elif path.is_file():
            found = [str(path)]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not found:
                raise DataConfigError(f"{flag} {pattern}: no such file, folder or glob match")
        files += [f for f in found if f not in files]
    return files


def read_records(path: str, options: FormatOptions) -> Iterator[Conversation | Rejection]:
    """Every record of one file, as conversations or rejections, in file order.

    An unreadable file (permissions, a folder) is a `DataConfigError` naming it."""
    detected = None if options.data_format == "auto" else options.data_format
    try:
        for source, item, raw in json_records(path):
            if isinstance(item, Rejection):
                yield item
                continue
            try:
                if not isinstance(item, dict):
                    raise BadRecordError(f"expected a JSON object, got {_json_type(item)}")
                problem = unusable_value(item)
                if problem:
                    raise BadRecordError(problem)
                fmt = detected or detect_format(item, options)
                messages, tools = _convert(item, fmt, options, first=detected is None)
                detected = fmt
                yield Conversation(source, messages, tools)
            except BadRecordError as error:
                yield Rejection(source, error.reason, raw if raw is not None else record_text(item))
    except OSError as error:
        raise DataConfigError(f"{path}: cannot read the file ({error.strerror or error})") from None


def _convert(item: dict, fmt: str, options: FormatOptions, first: bool):
    """The record in format `fmt`; when that format came from an earlier record and this one is
    plainly another, the reason says so rather than naming a missing field."""
    try:
        return CONVERTERS[fmt](item, options)
    except BadRecordError as error:
        if first or options.data_format != "auto":
            raise
        try:
            own = detect_format(item, options)
        except BadRecordError:
            raise error from None
        if own == fmt:
            raise
        raise BadRecordError(f"a {own} record in a file of {fmt} records (the format of its first good record): "
                             f"keep one format per file ({error.reason})") from None


def _json_type(value) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)


# ---- formats -------------------------------------------------------------------------------------

def detect_format(record: dict, options: FormatOptions) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if options.prompt_column in record or options.response_column in record:
        return "prompt_response"
    raise BadRecordError(
        f"cannot tell the format from the keys {_shown(sorted(record))}: expected 'messages', 'conversations', "
        f"'instruction' or '{options.prompt_column}' (or pass --data_format)"
    )


def _shown(value) -> str:
    """repr(value), cut to SHOWN_CHARS: a reason quotes a bad value, never a megabyte of it."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f"... ({len(text)} characters)"


def _string(record: dict, key: str, *, required: bool = True, nonempty: bool = False, what: str = "field"):
    if key not in record or record[key] is None:
        if required:
            raise BadRecordError(f"missing {what} '{key}'")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise BadRecordError(f"{what} '{key}' must be a string, got {_json_type(value)}")
    if nonempty and not value.strip():
        raise BadRecordError(f"empty response in {what} '{key}'")
    return value


def _history(record: dict, key: str) -> list[dict]:
    history = record.get(key)
    if history is None:
        return []
    if not isinstance(history, list):
        raise BadRecordError(f"field '{key}' must be a list of [prompt, response] pairs, got {_json_type(history)}")
    messages = []
    for index, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRecordError(f"{key}[{index}] is not a [prompt, response] pair of strings")
        if not pair[1].strip():
            raise BadRecordError(f"{key}[{index}] has an empty response")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def _system(record: dict, key: str) -> list[dict]:
    system = _string(record, key, required=False)
    return [{"role": "system", "content": system}] if system else []


def _tools(record: dict) -> list | None:
    tools = record.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise BadRecordError(f"field 'tools' is a string but not JSON: {error.msg}") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise BadRecordError("field 'tools' must be a list of tool (function) descriptions")
    return tools


def from_prompt_response(record: dict, options: FormatOptions):
    prompt = _string(record, options.prompt_column)
    response = _string(record, options.response_column, nonempty=True)
    messages = _system(record, options.system_column) + _history(record, options.history_column)
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], None


def from_alpaca(record: dict, options: FormatOptions):
    instruction = _string(record, "instruction")
    extra_input = _string(record, "input", required=False)
    output = _string(record, "output", nonempty=True)
    prompt = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
    messages = _system(record, options.system_column) + _history(record, options.history_column)
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}], None


def from_sharegpt(record: dict, options: FormatOptions):
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecordError("field 'conversations' must be a non-empty list of {'from', 'value'} turns")
    messages = _system(record, options.system_column)
    for index, turn in enumerate(turns):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise BadRecordError(f"{where} must be an object, got {_json_type(turn)}")
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
        if role is None:
            raise BadRecordError(f"{where}: 'from' must be one of {', '.join(SHAREGPT_ROLES)}, got {_shown(turn.get('from'))}")
        value = _string(turn, "value", what=f"{where} key", nonempty=role == "assistant")
        messages.append({"role": role, "content": value})
    return _require_assistant(messages), _tools(record)


def from_messages(record: dict, options: FormatOptions):
    raw = record.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRecordError("field 'messages' must be a non-empty list of {'role', 'content'} messages")
    messages = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRecordError(f"{where} must be an object, got {_json_type(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise BadRecordError(f"{where}: 'role' must be one of {', '.join(ROLES)}, got {_shown(role)}")
        calls_tools = role == "assistant" and bool(message.get("tool_calls"))
        content = _string(message, "content", what=f"{where} key", required=not calls_tools,
                          nonempty=role == "assistant" and not calls_tools) or ""
        converted = {"role": role, "content": content}
        converted.update({key: message[key] for key in MESSAGE_EXTRA_KEYS if key in message})
        messages.append(converted)
    return _require_assistant(messages), _tools(record)


def _require_assistant(messages: list[dict]) -> list[dict]:
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRecordError("the conversation has no assistant message to learn from")
    return messages


CONVERTERS = {
    "prompt_response": from_prompt_response,
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
}
