"""build_datasets: bad records stop or are skipped with path:line reasons; cache; workers; streaming."""

from __future__ import annotations

import json

import pytest
from data_helpers import RECORDS, fresh, write_jsonl

from lorafit.data import pipeline
from lorafit.data.args import DataArguments
from lorafit.data.errors import BadRecordsError, DataConfigError
from lorafit.data.pipeline import build_datasets
from lorafit.data.render import render_example


@pytest.fixture
def tokenizer(smol_tokenizer):
    return fresh(smol_tokenizer)


def args(tmp_path, files, **overrides) -> DataArguments:
    return DataArguments(train_file=[str(f) for f in files], data_cache_dir=str(tmp_path / "cache"), **overrides)


def good(i: int) -> dict:
    return {"prompt": f"Question {i}?", "response": f"Answer {i}."}


@pytest.fixture
def mixed_file(tmp_path):
    return write_jsonl(tmp_path / "mixed.jsonl", [good(0), {"prompt": "x"}, good(1), {"response": "y"}, good(2)],
                       raw_lines={2: b"", 4: b"\xff\xfe"})


def test_error_mode_lists_every_bad_record_and_stops(tmp_path, tokenizer, mixed_file):
    with pytest.raises(BadRecordsError) as caught:
        build_datasets(args(tmp_path, [mixed_file]), tokenizer, output_dir=str(tmp_path / "out"))
    assert str(caught.value).splitlines() == [
        "3 bad records (fix them, or pass --on_bad_record skip):",
        f"{mixed_file}:2: missing field 'response'",
        f"{mixed_file}:5: invalid UTF-8 (byte 0xff at column 1)",
        f"{mixed_file}:6: missing field 'prompt'",
    ]
    assert not (tmp_path / "out" / "rejected.jsonl").exists()


def test_error_list_is_capped(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}] * 60)
    with pytest.raises(BadRecordsError) as caught:
        build_datasets(args(tmp_path, [path]), tokenizer)
    lines = str(caught.value).splitlines()
    assert len(lines) == 52 and lines[0].startswith("60 bad records") and lines[-1] == "... and 10 more"


def test_skip_mode_writes_rejected_and_goes_on(tmp_path, tokenizer, mixed_file):
    prepared = build_datasets(args(tmp_path, [mixed_file], on_bad_record="skip"), tokenizer,
                              output_dir=str(tmp_path / "out"), keep_source=True)
    assert prepared.train["source"] == [f"{mixed_file}:{n}" for n in (1, 4, 7)]
    assert prepared.train.column_names == ["source", "input_ids", "labels"]
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rejected] == [
        (f"{mixed_file}:2", "missing field 'response'"),
        (f"{mixed_file}:5", "invalid UTF-8 (byte 0xff at column 1)"),
        (f"{mixed_file}:6", "missing field 'prompt'")]
    assert json.loads(rejected[0]["record"]) == {"prompt": "x"}
    summary = prepared.summary
    assert (summary.records_read, summary.rejected, summary.train_examples) == (6, 3, 3)
    expected = render_example(tokenizer, [{"role": "user", "content": "Question 1?"},
                                          {"role": "assistant", "content": "Answer 1."}])
    assert prepared.train[1]["input_ids"] == expected["input_ids"] and prepared.train[1]["labels"] == expected["labels"]
    assert summary.tokens == sum(map(len, prepared.train["input_ids"]))
    assert summary.trained_tokens == sum(label != -100 for row in prepared.train["labels"] for label in row)
    assert "rejected            3" in summary.format()


def test_render_failures_are_bad_records_too(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", [good(0), {"prompt": "x", "response": "refuse me"}])
    tokenizer.chat_template = ("{% for m in messages %}{% if m['content'] == 'refuse me' %}"
                               "{{ raise_exception('no thanks') }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(BadRecordsError, match=r"data.jsonl:2: the chat template refused this conversation: no thanks"):
        build_datasets(args(tmp_path, [path]), tokenizer)
    prepared = build_datasets(args(tmp_path, [path], on_bad_record="skip"), tokenizer, output_dir=str(tmp_path))
    assert len(prepared.train) == 1
    rejected = json.loads((tmp_path / "rejected.jsonl").read_text())
    assert rejected["messages"][1]["content"] == "refuse me"


def test_examples_without_trainable_tokens_are_dropped_and_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", [good(0), good(1)])
    with pytest.raises(DataConfigError, match="no usable training example.*2 with no trainable token"):
        build_datasets(args(tmp_path, [path], cutoff_len=1), tokenizer)
    prepared = build_datasets(args(tmp_path, [path], max_target_length=2, cutoff_len=40), tokenizer)
    assert prepared.summary.responses_cut == 2 and prepared.summary.truncated == 2
    assert "lost their end-of-turn token" in prepared.summary.format()


def test_cache_is_reused_and_keyed(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "data.jsonl", [good(i) for i in range(5)])
    first = build_datasets(args(tmp_path, [path]), tokenizer)
    calls = []
    monkeypatch.setattr(pipeline, "_prepare", lambda *a: calls.append(a) or pytest.fail("cache not used"))
    again = build_datasets(args(tmp_path, [path]), tokenizer)
    assert again.summary.cache_path == first.summary.cache_path and again.train[:] == first.train[:]
    monkeypatch.undo()
    changed = build_datasets(args(tmp_path, [path], train_on="all"), tokenizer)
    assert changed.summary.cache_path != first.summary.cache_path
    other_template = build_datasets(args(tmp_path, [path], template="alpaca"), tokenizer)
    assert other_template.summary.cache_path not in (first.summary.cache_path, changed.summary.cache_path)
    rebuilt = build_datasets(args(tmp_path, [path], overwrite_cache=True), fresh(tokenizer.__class__.from_pretrained(
        tokenizer.name_or_path)))
    assert rebuilt.train[:] == first.train[:]


def test_workers_give_the_same_result(tmp_path, tokenizer):
    # formats are detected per file: one file of each
    files = [write_jsonl(tmp_path / "data.jsonl", [good(i) for i in range(12)]),
             write_jsonl(tmp_path / "chat.jsonl", [RECORDS["messages"]] * 3)]
    one = build_datasets(args(tmp_path, files), tokenizer)
    two = build_datasets(args(tmp_path / "w", files, preprocessing_num_workers=2), tokenizer)
    assert len(one.train) == 15
    assert one.train[:] == two.train[:]


def test_validation_file_split_and_sample_limits(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [good(i) for i in range(20)])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [good(100), good(101)])
    prepared = build_datasets(args(tmp_path, [train], validation_file=[str(evaluation)]), tokenizer)
    assert (len(prepared.train), len(prepared.eval)) == (20, 2)
    split = build_datasets(args(tmp_path, [train], validation_split_percentage=25, max_train_samples=10), tokenizer)
    assert (len(split.train), len(split.eval)) == (10, 5) and split.summary.eval_examples == 5
    none = build_datasets(args(tmp_path, [train]), tokenizer)
    assert none.eval is None


def test_streaming_matches_the_in_memory_pipeline(tmp_path, tokenizer, mixed_file):
    memory = build_datasets(args(tmp_path, [mixed_file], on_bad_record="skip"), tokenizer)
    streamed = build_datasets(args(tmp_path, [mixed_file], on_bad_record="skip", streaming=True), tokenizer,
                              output_dir=str(tmp_path / "out"))
    rows = sorted(json.dumps(row) for row in streamed.train)
    assert rows == sorted(json.dumps(row) for row in memory.train)
    assert streamed.summary.rejected == 3 and streamed.summary.tokens is None
    assert (tmp_path / "out" / "rejected.jsonl").is_file()
    with pytest.raises(BadRecordsError, match="mixed.jsonl:2"):
        build_datasets(args(tmp_path, [mixed_file], streaming=True), tokenizer)


def test_streaming_split_is_stable_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", [good(i) for i in range(40)])
    prepared = build_datasets(args(tmp_path, [path], streaming=True, validation_split_percentage=30), tokenizer)
    train = {json.dumps(row["input_ids"]) for row in prepared.train}
    evaluation = [json.dumps(row["input_ids"]) for row in prepared.eval]
    assert train.isdisjoint(evaluation) and len(train) + len(evaluation) == 40 and 3 <= len(evaluation) <= 25
    assert evaluation == [json.dumps(row["input_ids"]) for row in prepared.eval]


def test_alpaca_demo_slice(tmp_path, tokenizer, alpaca_demo_path):
    records = json.loads(alpaca_demo_path.read_text())[:40]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    prepared = build_datasets(args(tmp_path, [path], template="alpaca"), tokenizer)
    assert prepared.summary.train_examples == 40 and prepared.summary.rejected == 0
    for record, row in zip(records, prepared.train):
        trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
        assert trained == record["output"] + tokenizer.eos_token


def test_data_arguments_parse_like_the_recipe(tmp_path):
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--train_file", "a.jsonl", "b.jsonl", "--train_file", "c.jsonl", "--prompt_type", "standard_alpaca",
         "--max_source_length", "1024", "--ignore_pad_token_for_loss", "false", "--packing"])
    assert parsed.train_file == ["a.jsonl", "b.jsonl", "c.jsonl"] and parsed.template_choice == "alpaca"
    assert parsed.max_source_length == 1024 and parsed.max_target_length is None and parsed.packing
    assert DataArguments(train_file="x.jsonl,y.jsonl").train_file == ["x.jsonl", "y.jsonl"]
    with pytest.raises(DataConfigError, match="--cutoff_len must be at least 1"):
        DataArguments(cutoff_len=0)
    with pytest.raises(DataConfigError, match="--train_on 'assistant': expected one of all_assistant"):
        DataArguments(train_on="assistant")  # as from a YAML file, which argparse never sees
    for field in DataArguments.__dataclass_fields__.values():
        assert field.metadata.get("help"), field.name
