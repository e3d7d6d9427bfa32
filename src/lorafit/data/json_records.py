"""Data files -> JSON values, one per record, each with its source; every failure is a `Rejection`.

The floor below `formats`: it knows JSON, not conversations. A file whose first non-blank byte is
``[`` is a JSON array, parsed whole (a record's source is ``path:#index``, 0-based); anything else is
JSON Lines, read line by line so it may be larger than memory (``path:line``, 1-based, counting
blank lines, which are not records). A ``.jsonl`` file is always JSON Lines, so one whose first record
is an array loses that line, not the whole file. A UTF-8 byte order mark is skipped at the start of
a file and at the start of any line (files joined with `cat` keep theirs).

Nothing here raises for a bad record. A line is rejected when it is not UTF-8 or not JSON (a
number too long for `int`, or nesting past the interpreter's recursion limit, included); a value
is unusable (`unusable_value`) when a string or key in it holds a lone UTF-16 surrogate
(``"\\ud800"`` is valid JSON but no tokenizer or UTF-8 file can hold it) or when it nests deeper
than `MAX_NESTING`. A file that cannot be opened is the caller's to report (an `OSError`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

UTF8_BOM = b"\xef\xbb\xbf"
# Deeper records are refused: real ones (tool schemas included) nest a few levels, and Python's own
# recursion limit would otherwise stop the run somewhere downstream.
MAX_NESTING = 64


@dataclass
class Rejection:
    source: str
    reason: str
    raw: str | None = None  # the record as read (JSON text), for rejected.jsonl


def json_records(path: str):
    """(source, parsed value or Rejection, raw text or None) for each record of a JSON or JSON Lines file."""
    with open(path, "rb") as handle:
        head = handle.read(64).removeprefix(UTF8_BOM).lstrip()
    if head.startswith(b"[") and not str(path).endswith(".jsonl"):
        yield from _json_array_records(path)
    else:
        yield from _json_lines_records(path)


def _json_lines_records(path: str):
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            source = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8").lstrip("\ufeff")
            except UnicodeDecodeError as error:
                bad = line[error.start:error.start + 1].hex()
                yield source, Rejection(source, f"invalid UTF-8 (byte 0x{bad} at column {error.start + 1})",
                                        line.decode("utf-8", "replace").rstrip("\r\n")), None
                continue
            text = text.rstrip("\r\n")
            if not text.strip():
                continue  # a line holding only a byte order mark
            value, problem = parse_json(text)
            if problem is None:
                yield source, value, text
            else:
                yield source, Rejection(source, problem.reason(with_line=False), text), None


def _json_array_records(path: str):
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        yield path, Rejection(f"{path}:{line}", "invalid UTF-8: the whole JSON file cannot be read"), None
        return
    items, problem = parse_json(text)
    if problem is not None:
        yield path, Rejection(f"{path}:{problem.line or 1}",
                              f"{problem.reason(with_line=False)}; the whole JSON file cannot be read"), None
        return
    for index, item in enumerate(items):
        yield f"{path}:#{index}", item, None  # its text is made only if it is rejected (record_text)


@dataclass
class JsonProblem:
    message: str
    line: int | None = None
    column: int | None = None

    def reason(self, with_line: bool = True) -> str:
        if self.column is None:
            return f"invalid JSON: {self.message}"
        where = f"line {self.line}, column {self.column}" if with_line else f"column {self.column}"
        return f"invalid JSON: {self.message} ({where})"


def parse_json(text: str):
    """(value, None) or (None, JsonProblem): `json.loads` with every way it fails as a problem, a
    plain ValueError (a number too long for int()) and RecursionError (deep nesting) included."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as error:
        message = error.msg
        if message.startswith("Invalid control character"):
            message = "a control character inside a string must be written escaped (\\n, \\t, \\u0000)"
        return None, JsonProblem(message, error.lineno, error.colno)
    except ValueError as error:
        if "integer string conversion" in str(error):  # CPython's guard against slow int() parsing
            return None, JsonProblem(f"a number with more than {sys.get_int_max_str_digits()} digits")
        return None, JsonProblem(_first_line(error))
    except RecursionError:
        return None, JsonProblem(f"nested too deeply to read (records deeper than {MAX_NESTING} levels are refused)")


def unusable_value(value) -> str | None:
    """Why a parsed JSON value cannot be used as text, or None: a string or key holding a lone UTF-16
    surrogate, or nesting deeper than MAX_NESTING. Walks without recursion; the reason names the field."""
    pending = [(value, "", 0)]
    while pending:
        item, where, depth = pending.pop()
        if depth > MAX_NESTING:
            return f"nested deeper than {MAX_NESTING} levels (at {where})"
        if isinstance(item, str):
            if not is_text(item):
                return f"field {where or 'value'} holds a lone UTF-16 surrogate (not valid Unicode text)"
        elif isinstance(item, dict):
            for key, child in item.items():
                if not is_text(key):
                    return f"a key in {where or 'the record'} holds a lone UTF-16 surrogate (not valid Unicode text)"
                label = key if key and key.isprintable() else json.dumps(key)  # the reason stays one line
                pending.append((child, f"{where}.{label}" if where else label, depth + 1))
        elif isinstance(item, list):
            pending.extend((child, f"{where}[{index}]", depth + 1) for index, child in enumerate(item))
    return None


def is_text(value: str) -> bool:
    """True when `value` can be written as UTF-8 (no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def record_text(value) -> str | None:
    """The value as JSON text for rejected.jsonl (\\u-escaped where it is not valid text)."""
    try:
        text = json.dumps(value, ensure_ascii=False)
        return text if is_text(text) else json.dumps(value)
    except (ValueError, RecursionError):
        return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
