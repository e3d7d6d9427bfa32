"""Readers: every format to the same conversation, sources as path:line, each bad record its reason."""

from __future__ import annotations

import json

import pytest
from data_helpers import CONVERSATION, RECORDS, write_jsonl

from lorafit.data.errors import DataConfigError
from lorafit.data.formats import Conversation, FormatOptions, Rejection, read_records, resolve_files

GOOD = {"prompt": "Hi", "response": "Hello"}


def read(path, **options):
    return list(read_records(str(path), FormatOptions(**options)))


def test_mixed_file_reports_each_bad_line_with_its_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),  # 1: a UTF-8 BOM is fine
        b"",  # 2: blank lines are not records
        b"   ",  # 3
        b'{"prompt": "caf\xe9", "response": "x"}',  # 4: Latin-1, not UTF-8
        b"[1, 2]",  # 5
        b'{"prompt": "no answer"}',  # 6
        b'{"prompt": ["a"], "response": "x"}',  # 7
        b'{"prompt": "q", "response": "a", "history": [["only one"]]}',  # 8
        b'{"prompt": "q", "response": "  "}',  # 9
        b'{"prompt": "q", "response": "a"',  # 10: truncated JSON
        json.dumps({"prompt": "Bye", "response": "Ciao", "history": [["a", "b"]]}).encode(),  # 11
    ]
    path.write_bytes(b"\n".join(lines) + b"\r\n")
    items = read(path)
    assert [item.source for item in items if isinstance(item, Conversation)] == [f"{path}:1", f"{path}:11"]
    rejected = {item.source.rsplit(":", 1)[1]: item.reason for item in items if isinstance(item, Rejection)}
    assert rejected == {
        "4": "invalid UTF-8 (byte 0xe9 at column 16)",
        "5": "expected a JSON object, got an array",
        "6": "missing field 'response'",
        "7": "field 'prompt' must be a string, got an array",
        "8": "history[0] is not a [prompt, response] pair of strings",
        "9": "empty response in field 'response'",
        "10": "invalid JSON: Expecting ',' delimiter (column 32)",
    }
    assert items[0].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize("data_format", list(RECORDS))
def test_every_format_detected_and_explicit(tmp_path, data_format):
    path = write_jsonl(tmp_path / "one.jsonl", [RECORDS[data_format]])
    for chosen in ("auto", data_format):
        (item,) = read(path, data_format=chosen)
        assert isinstance(item, Conversation) and item.messages == CONVERSATION


def test_json_array_sources_are_indexes(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, {"prompt": "x"}, RECORDS["alpaca"]]), encoding="utf-8-sig")
    items = read(path)
    assert [item.source for item in items] == [f"{path}:#0", f"{path}:#1", f"{path}:#2"]
    assert isinstance(items[1], Rejection) and items[1].reason == "missing field 'response'"
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"prompt": "a",\n')
    (item,) = read(broken)
    assert isinstance(item, Rejection) and item.source == f"{broken}:3" and "whole JSON file" in item.reason


def test_alpaca_input_joins_instruction_with_a_blank_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate.", "input": "chat", "output": "cat"},
                                              {"instruction": "Add.", "output": "2"}])
    first, second = read(path)
    assert first.messages[0] == {"role": "user", "content": "Translate.\n\nchat"}
    assert second.messages == [{"role": "user", "content": "Add."}, {"role": "assistant", "content": "2"}]


def test_custom_columns_and_system(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"q": "Hi", "a": "Yo", "h": [["1", "2"]], "sys": "S"}])
    (item,) = read(path, prompt_column="q", response_column="a", history_column="h", system_column="sys")
    assert [m["role"] for m in item.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_sharegpt_roles_and_tools(tmp_path):
    tools = [{"name": "add", "parameters": {}}]
    record = {"tools": json.dumps(tools), "conversations": [
        {"from": "human", "value": "1+1?"}, {"from": "function_call", "value": '{"name": "add"}'},
        {"from": "observation", "value": "2"}, {"from": "gpt", "value": "2."}]}
    bad_role = {"conversations": [{"from": "robot", "value": "x"}]}
    no_reply = {"conversations": [{"from": "human", "value": "x"}]}
    list_role = {"conversations": [{"from": ["human"], "value": "x"}]}  # unhashable: still a bad record
    item, role_error, reply_error, list_error = read(
        write_jsonl(tmp_path / "s.jsonl", [record, bad_role, no_reply, list_role]))
    assert [m["role"] for m in item.messages] == ["user", "assistant", "tool", "assistant"] and item.tools == tools
    assert "'from' must be one of" in role_error.reason and "'from' must be one of" in list_error.reason
    assert reply_error.reason == "the conversation has no assistant message to learn from"


def test_messages_validation(tmp_path):
    records = [{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
               {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]},
               {"messages": []}, {"foo": 1}]
    reasons = [item.reason for item in read(write_jsonl(tmp_path / "m.jsonl", records), data_format="messages")]
    assert reasons == ["messages[1]: 'role' must be one of system, user, assistant, tool, got 'bot'",
                       "messages[1] key 'content' must be a string, got a number",
                       "field 'messages' must be a non-empty list of {'role', 'content'} messages",
                       "field 'messages' must be a non-empty list of {'role', 'content'} messages"]
    (undetected,) = read(write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}]))
    assert "cannot tell the format" in undetected.reason and "--data_format" in undetected.reason


def test_files_folders_and_globs(tmp_path):
    for name in ("b.jsonl", "a.json", "notes.txt", "sub/c.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("[]")
    folder = resolve_files([str(tmp_path)])
    assert folder == [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl"), str(tmp_path / "sub" / "c.jsonl")]
    assert resolve_files([str(tmp_path / "*.jsonl"), str(tmp_path / "b.jsonl")]) == [str(tmp_path / "b.jsonl")]
    with pytest.raises(DataConfigError, match="no such file"):
        resolve_files([str(tmp_path / "missing.jsonl")])
