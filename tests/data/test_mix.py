"""Mixing training files: --max_samples per file, concat, and the two interleave strategies."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from data_helpers import fresh, write_jsonl

from lorafit.data.args import DataArguments
from lorafit.data.errors import DataConfigError
from lorafit.data.mix import mix, parse_probs
from lorafit.data.pipeline import build_datasets

TASK = [("task", i) for i in range(10)]
GENERAL = [("general", i) for i in range(100)]


def origins(records):
    return Counter(origin for origin, _ in records)


def test_concat_keeps_every_record_in_file_order_and_max_samples_cuts_each_file():
    assert mix([TASK, GENERAL]) == TASK + GENERAL
    assert mix([TASK, GENERAL], max_samples=4) == TASK[:4] + GENERAL[:4]


def test_interleave_under_stops_when_a_file_runs_out_and_never_repeats():
    mixed = mix([TASK, GENERAL], "interleave_under", probs=[0.5, 0.5], seed=1)
    counts = origins(mixed)
    assert counts["task"] == 10 and 0 < counts["general"] < 100
    assert len(set(mixed)) == len(mixed)
    assert mixed[-1][0] == "task"  # the run ends with the file that ran out


def test_interleave_under_follows_the_requested_ratio():
    mixed = mix([TASK * 50, GENERAL * 50], "interleave_under", probs=[0.2, 0.8], seed=0)
    share = origins(mixed)["task"] / len(mixed)
    assert 0.15 < share < 0.25


def test_interleave_over_oversamples_the_small_file_until_every_file_is_used():
    mixed = mix([TASK, GENERAL], "interleave_over", probs=[0.5, 0.5], seed=3)
    counts = origins(mixed)
    assert counts["general"] == 100 or set(GENERAL) <= set(mixed)
    assert set(GENERAL) <= set(mixed) and set(TASK) <= set(mixed)
    assert counts["task"] > 10  # the small file came round again


def test_the_mix_is_the_same_for_the_same_seed():
    assert mix([TASK, GENERAL], "interleave_under", seed=5) == mix([TASK, GENERAL], "interleave_under", seed=5)


@pytest.mark.parametrize("value, message", [
    ("0.5", "1 value(s) for 2 training file(s)"),
    ("a,b", "expected numbers"),
    ("-1,2", "non-negative"),
    ("0,0", "positive sum"),
])
def test_bad_interleave_probs_are_named(value, message):
    with pytest.raises(DataConfigError, match=re.escape(message)):
        parse_probs(value, 2)


def test_probs_are_normalized_and_a_yaml_list_is_accepted():
    assert parse_probs("3,1", 2) == [0.75, 0.25]
    assert DataArguments(train_file=["a"], interleave_probs=[0.8, 0.2]).interleave_probs == "0.8,0.2"


def test_bad_strategy_and_streaming_are_refused():
    with pytest.raises(DataConfigError, match="--mix_strategy 'shuffle'"):
        DataArguments(train_file=["a"], mix_strategy="shuffle")
    with pytest.raises(DataConfigError, match="drop --streaming"):
        DataArguments(train_file=["a"], max_samples=3, streaming=True)


def test_the_pipeline_trains_on_the_requested_counts(tmp_path, smol_tokenizer):
    task = write_jsonl(tmp_path / "task.jsonl", [{"prompt": f"Who are you {i}?", "response": "Ada."} for i in range(6)])
    general = write_jsonl(tmp_path / "general.jsonl",
                          [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(30)])
    data_args = DataArguments(train_file=[str(task), str(general)], max_samples=20,
                              data_cache_dir=str(tmp_path / "cache"))
    prepared = build_datasets(data_args, fresh(smol_tokenizer), keep_source=True)
    sources = Counter(source.split(":")[0] for source in prepared.train["source"])
    assert sources == {str(task): 6, str(general): 20}

    data_args = DataArguments(train_file=[str(task), str(general)], mix_strategy="interleave_over",
                              interleave_probs="0.5,0.5", data_cache_dir=str(tmp_path / "cache"))
    prepared = build_datasets(data_args, fresh(smol_tokenizer), keep_source=True)
    sources = Counter(source.split(":")[0] for source in prepared.train["source"])
    assert sources[str(general)] >= 30 and sources[str(task)] > 6
