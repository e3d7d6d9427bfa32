"""Bad data never escapes as an exception: property tests feeding the readers, the renderer and the
pipeline random and malformed records (promise 5 of issue 12).

Files are built line by line from records in every format, some left good, some mutated (a field
replaced by a value of another type, a lone surrogate, a NUL, control characters, a huge string,
deep nesting, a key removed), and raw lines that are not records at all (invalid UTF-8, truncated
JSON, too deep to parse, a BOM in mid-file, scalars). Each record must come out as a valid
conversation or as a rejection naming its own line; each conversation must render or be refused
with a `BadRecordError`; the pipeline must stop with the list (or, under ``skip``, write a readable
rejected.jsonl), and never raise anything else.
"""

from __future__ import annotations

import copy
import json

import pytest
from data_helpers import RECORDS, fresh
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.data.args import DataArguments
from lorafit.data.errors import BadRecordError, BadRecordsError, DataConfigError
from lorafit.data.formats import ROLES, Conversation, FormatOptions, Rejection, read_records
from lorafit.data.json_records import MAX_NESTING, is_text
from lorafit.data.pipeline import build_datasets
from lorafit.data.render import check_messages, render_example, render_prompt
from lorafit.data.streaming import check_files, stream_examples
from lorafit.data.templates import set_chat_template
from lorafit.data.truncate import Limits, fit_conversation

FORMATS = sorted(RECORDS)
SURROGATE = "\ud800"
HUGE = "word " * 40_000  # 200,000 characters
# Strings a careless export produces: control characters, NUL, escapes, BOMs, special-token text.
ODD_STRINGS = ["", " ", "a\x00b", "\x1b[2J\rline\r\n", "\t\x0b\x0c\x1c\u2028", "\ufeffhi", "<|im_end|>", "é😀中",
               SURROGATE, "x" + SURROGATE + "y", HUGE]
ODD_TEXT = st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=20))
LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), ODD_TEXT)
ANY_JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
                        max_leaves=6)


def nested(depth: int, leaf="x"):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def paths(value, prefix=()):
    """Every (container, key) position inside a record, to mutate one."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield value, key
            yield from paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield value, index
            yield from paths(child, prefix + (index,))


@st.composite
def records(draw):
    """(record, is_good, format): a good record of some format, maybe mutated."""
    fmt = draw(st.sampled_from(FORMATS))
    record = copy.deepcopy(RECORDS[fmt])
    mutations = draw(st.integers(0, 2))
    for _ in range(mutations):
        positions = list(paths(record))
        if not positions:
            break
        container, key = draw(st.sampled_from(positions))
        how = draw(st.sampled_from(["replace", "replace", "surrogate", "deep", "delete"]))
        if how == "replace":
            container[key] = draw(ANY_JSON)
        elif how == "surrogate":
            container[key] = SURROGATE
        elif how == "deep":
            container[key] = nested(draw(st.sampled_from([MAX_NESTING, 200])))
        elif isinstance(container, dict):
            del container[key]
        else:
            container.pop(key)
    return record, mutations == 0, fmt


RAW_BAD_LINES = [
    b"\xff\xfe{}", b'{"prompt": "caf\xc3", "response": "x"}', b'{"prompt": "a", "resp',  # bad UTF-8, truncated
    b"[" * 5000 + b"]" * 5000, b'{"prompt": 1' + b"0" * 5000 + b', "response": "x"}',  # too deep, too long a number
    b'{"prompt": "a\x00", "response": "b"}', b"42", b'"just a string"', b"null", b"[1, 2]", b"{}", b"{",
    b"\x00\x00\x00",  # a raw NUL inside a string, scalars, an array, nothing, NUL bytes
]
BOM_LINE = b'\xef\xbb\xbf{"prompt": "a", "response": "b"}'  # a record from a file joined with `cat`: good


@st.composite
def jsonl_files(draw):
    """(bytes of the file, {line number: (is_good, format) or None for a raw bad line})."""
    lines, expected = [], {}
    if draw(st.booleans()):
        lines.append(b"")  # a leading blank line
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            lines.append(draw(st.sampled_from(RAW_BAD_LINES)))
            expected[len(lines)] = None
        elif kind == 1:
            lines.append(BOM_LINE)
            expected[len(lines)] = (True, "prompt_response")
        else:
            record, good, fmt = draw(records())
            text = json.dumps(record, ensure_ascii=draw(st.booleans()) or not is_text(json.dumps(record, ensure_ascii=False)))
            lines.append(text.encode())
            expected[len(lines)] = (good, fmt)
        if draw(st.integers(0, 5)) == 0:
            lines.append(draw(st.sampled_from([b"", b"   ", b"\r"])))
    data = b"\n".join(lines) + draw(st.sampled_from([b"\n", b"", b"\r\n"]))
    bom = draw(st.booleans())
    return (b"\xef\xbb\xbf" if bom else b"") + data, expected


def check_conversation(conversation: Conversation) -> None:
    check_messages(conversation.messages)  # the renderer's input contract
    assert all(m["role"] in ROLES and is_text(m["content"]) for m in conversation.messages)
    assert any(m["role"] == "assistant" for m in conversation.messages)


SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


@SETTINGS
@given(file=jsonl_files())
def test_each_jsonl_line_is_one_conversation_or_one_rejection_of_that_line(tmp_path, file):
    data, expected = file
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    items = list(read_records(str(path), FormatOptions()))
    assert [int(item.source.rsplit(":", 1)[1]) for item in items] == sorted(expected)
    file_format = None
    for item in items:
        line = int(item.source.rsplit(":", 1)[1])
        if isinstance(item, Rejection):
            assert item.reason and "\n" not in item.reason and len(item.reason) < 400
            assert item.raw is None or is_text(item.raw)
            continue
        assert isinstance(item, Conversation)
        check_conversation(item)
        assert expected[line] is not None, f"a raw bad line was accepted: {data.splitlines()[line - 1][:80]!r}"
        good, fmt = expected[line]
        file_format = file_format or fmt
    for item in items:  # a good record in the file's format is never refused; one in another format says so
        line = int(item.source.rsplit(":", 1)[1])
        if expected[line] and expected[line][0] and file_format:
            if expected[line][1] == file_format:
                assert isinstance(item, Conversation), item
            else:
                assert isinstance(item, Rejection) and "keep one format per file" in item.reason


@SETTINGS
@given(items=st.lists(records(), max_size=5), bom=st.booleans(), cut=st.one_of(st.none(), st.integers(1, 200)))
def test_a_json_array_file_is_read_whole_or_refused_in_one_line(tmp_path, items, bom, cut):
    values = [record for record, _, _ in items]
    text = json.dumps(values, ensure_ascii=not is_text(json.dumps(values, ensure_ascii=False)))
    data = text.encode()
    truncated = cut is not None and cut < len(data) - 1
    path = tmp_path / "data.json"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + (data[:cut] if truncated else data))
    result = list(read_records(str(path), FormatOptions()))
    if truncated:  # one rejection for the whole file, at the line where reading stopped
        assert len(result) == 1 and "the whole JSON file cannot be read" in result[0].reason
        return
    assert [item.source for item in result] == [f"{path}:#{i}" for i in range(len(items))]
    for item, (_, good, _) in zip(result, items):
        if isinstance(item, Conversation):
            check_conversation(item)
        else:
            assert item.reason and "\n" not in item.reason and (item.raw is None or is_text(item.raw))


@pytest.fixture(scope="module")
def tokenizers(smol_tokenizer):
    return {name: set_chat_template(fresh(smol_tokenizer), name) for name in ("auto", "alpaca")}


@SETTINGS
@given(file=jsonl_files(), template=st.sampled_from(["auto", "alpaca"]),
       limits=st.sampled_from([Limits(2048), Limits(16), Limits(64, 8, 4), Limits(None)]))
def test_every_conversation_read_renders_or_is_a_bad_record(tmp_path, tokenizers, file, template, limits):
    path = tmp_path / "data.jsonl"
    path.write_bytes(file[0])
    tokenizer = tokenizers[template]
    for item in read_records(str(path), FormatOptions()):
        if isinstance(item, Conversation):
            try:
                rendered, _ = fit_conversation(tokenizer, item.messages, limits, item.tools)
            except BadRecordError as error:
                assert error.reason
                continue
            assert limits.cutoff_len is None or len(rendered.input_ids) <= limits.cutoff_len


MESSAGE_VALUE = st.one_of(ANY_JSON, st.fixed_dictionaries({"role": st.sampled_from([*ROLES, "Assistant", 5, None]),
                                                           "content": st.one_of(ODD_TEXT, ANY_JSON)}))


@SETTINGS
@given(messages=st.one_of(ANY_JSON, st.lists(MESSAGE_VALUE, max_size=4)), template=st.sampled_from(["auto", "alpaca"]))
def test_the_renderer_takes_any_value_and_answers_with_an_example_or_a_bad_record(tokenizers, messages, template):
    tokenizer = tokenizers[template]
    for render in (lambda: render_example(tokenizer, messages), lambda: render_prompt(tokenizer, messages),
                   lambda: fit_conversation(tokenizer, messages, Limits(32))):
        try:
            render()
        except BadRecordError as error:
            assert error.reason


def data_args(tmp_path, path, **overrides) -> DataArguments:
    return DataArguments(train_file=[str(path)], data_cache_dir=str(tmp_path / "cache"), **overrides)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(file=jsonl_files())
def test_the_pipeline_stops_with_the_list_or_skips_into_a_readable_rejected_file(tmp_path_factory, tokenizers, file):
    tmp_path = tmp_path_factory.mktemp("pipeline")
    path = tmp_path / "data.jsonl"
    path.write_bytes(file[0])
    tokenizer = tokenizers["auto"]
    read_rejections = {item.source for item in read_records(str(path), FormatOptions()) if isinstance(item, Rejection)}

    stopped_out = tmp_path / "stopped"
    try:
        build_datasets(data_args(tmp_path, path, cutoff_len=64), tokenizer, output_dir=str(stopped_out))
        assert not read_rejections
    except BadRecordsError as error:
        listed = {line.rsplit(": ", 1)[0].split(": ")[0] for line in str(error).splitlines()[1:]}
        assert read_rejections <= {source for source in listed} | {"..."}
        assert not stopped_out.exists()  # nothing written from a file with bad records
    except DataConfigError as error:
        assert "no usable training example" in str(error)

    skipped_out = tmp_path / "skipped"
    try:
        prepared = build_datasets(data_args(tmp_path, path, cutoff_len=64, on_bad_record="skip", overwrite_cache=True),
                                  tokenizer, output_dir=str(skipped_out), keep_source=True)
    except DataConfigError as error:
        assert "no usable training example" in str(error)
        return
    assert not set(prepared.train["source"]) & read_rejections
    rejected = skipped_out / "rejected.jsonl"
    if read_rejections:
        rows = [json.loads(line) for line in rejected.read_bytes().decode("utf-8").split("\n") if line]
        assert read_rejections <= {row["source"] for row in rows}


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(file=jsonl_files(), on_bad_record=st.sampled_from(["error", "skip"]))
def test_streaming_reads_the_same_files_without_escaping_exceptions(tmp_path_factory, tokenizers, file, on_bad_record):
    from lorafit.data.summary import DataSummary

    path = tmp_path_factory.mktemp("stream") / "data.jsonl"
    path.write_bytes(file[0])
    options = FormatOptions()
    problems = check_files([str(path)], options, DataSummary())
    assert {p["source"] for p in problems} == {item.source for item in read_records(str(path), options)
                                                if isinstance(item, Rejection)}
    examples = stream_examples([str(path)], options, tokenizers["auto"], Limits(64), "all_assistant", (),
                               "all", 0, on_bad_record)
    try:
        for example in examples:
            assert len(example["input_ids"]) == len(example["labels"]) <= 64
    except BadRecordsError:
        assert on_bad_record == "error"


def test_an_unreadable_file_is_one_error_naming_it(tmp_path):
    folder = tmp_path / "not-a-file.jsonl"
    folder.mkdir()  # opening it fails as a file that cannot be read does (root ignores permissions)
    with pytest.raises(DataConfigError, match="not-a-file.jsonl: cannot read the file"):
        list(read_records(str(folder), FormatOptions()))


def test_a_field_name_with_control_characters_keeps_the_reason_on_one_line():
    """Found by the property test above: a key holding a newline was copied into the reason as is."""
    from lorafit.data.json_records import unusable_value

    reason = unusable_value({"history": {"\x1b[2J\rline\r\n": "\ud800"}})
    assert reason == 'field history."\\u001b[2J\\rline\\r\\n" holds a lone UTF-16 surrogate (not valid Unicode text)'
    assert unusable_value({"history": {"a key": "\ud800"}}).startswith("field history.a key holds")
