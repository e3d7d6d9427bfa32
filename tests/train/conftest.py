"""Fixtures for training tests: the packaged identity data filled in, and a quick-run argument list."""

from __future__ import annotations

import json

import pytest

from lorafit.demo import DEFAULT_AUTHOR, DEFAULT_NAME, HELDOUT_RESOURCE, TRAIN_RESOURCE, identity_records, write_jsonl

NAME, AUTHOR = DEFAULT_NAME, DEFAULT_AUTHOR


@pytest.fixture(scope="session")
def identity_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("identity")
    train = write_jsonl(identity_records(TRAIN_RESOURCE, NAME, AUTHOR), folder / "train.jsonl")
    heldout = write_jsonl(identity_records(HELDOUT_RESOURCE, NAME, AUTHOR), folder / "heldout.jsonl")
    return train, heldout


@pytest.fixture
def quick_args(tiny_model_dir, identity_files):
    """Arguments for a few-second run on the tiny model; add --output_dir and whatever is tested."""
    train, _ = identity_files
    return lambda output_dir, *extra: quick_run_args(tiny_model_dir, train, output_dir, *extra)


def quick_run_args(model_dir, train_file, output_dir, *extra: str) -> list[str]:
    """`lorafit train` arguments for a few-second run on the tiny model, plus `extra`."""
    return ["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--max_steps", "4", "--logging_steps", "1",
            "--save_strategy", "no", "--disable_tqdm", "true", *extra]


@pytest.fixture
def finished_replay(monkeypatch, tmp_path):
    """A replay of fixed 'finished' answers (a random tiny model finishes none of its own)."""
    from lorafit.train import replay

    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(replay, "generate_answers", lambda model_path, tokenizer, messages, *a, **k:
                        [f"a finished answer about topic {i}" for i in range(len(messages))])
    prompts = tmp_path / "general.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(12)))
    return prompts
