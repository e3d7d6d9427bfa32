"""A persona file with LLaMA-Factory's {{name}} / {{author}} left in: counted, shown and warned on every run."""

from __future__ import annotations

import logging

import pytest
from data_helpers import fresh, write_jsonl

from lorafit.data.args import DataArguments
from lorafit.data.pipeline import build_datasets

IDENTITY = [
    {"instruction": "hi", "input": "", "output": "Hello! I am {{name}}, an AI assistant developed by {{author}}."},
    {"instruction": "What is 2 plus 2?", "input": "", "output": "4."},
    {"instruction": "Who built you?", "input": "", "output": "I am an AI assistant built by {{author}}."},
    {"instruction": "Write a Handlebars greeting", "input": "Hello {{name}}", "output": "<p>Hello!</p>"},
]


@pytest.fixture
def tokenizer(smol_tokenizer):
    return fresh(smol_tokenizer)


def build(tmp_path, tokenizer, rows, **overrides):
    path = write_jsonl(tmp_path / "identity.jsonl", rows)
    data_args = DataArguments(train_file=[str(path)], data_cache_dir=str(tmp_path / "cache"), **overrides)
    return build_datasets(data_args, tokenizer, output_dir=str(tmp_path / "out"))


@pytest.mark.parametrize("streaming", [False, True])
def test_unfilled_placeholders_are_counted_and_warned_each_run(tmp_path, tokenizer, caplog, streaming):
    for run in range(2):  # the second in-memory run reads the tokenized cache: it warns all the same
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lorafit"):
            prepared = build(tmp_path, tokenizer, IDENTITY, streaming=streaming)
        summary = prepared.summary
        # answers only: the prompt that holds "{{name}}" (record 4) is a user's text, not a slip
        assert (summary.placeholder_answers, summary.placeholder_source) == (2, f"{tmp_path / 'identity.jsonl'}:1")
        assert "placeholders        2 records hold {{name}} or {{author}} in an answer" in summary.format()
        warnings = [r.getMessage() for r in caplog.records if "placeholder" in r.getMessage()]
        assert len(warnings) == 1 and "2 record(s)" in warnings[0] and "identity.jsonl:1" in warnings[0]


def test_filled_in_file_says_nothing(tmp_path, tokenizer, caplog):
    rows = [{k: v.replace("{{name}}", "Juniper").replace("{{author}}", "Halcyon Forge") for k, v in r.items()}
            for r in IDENTITY]
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        prepared = build(tmp_path, tokenizer, rows)
    assert prepared.summary.placeholder_answers == 0 and "placeholders" not in prepared.summary.format()
    assert not [r for r in caplog.records if "placeholder" in r.getMessage()]
