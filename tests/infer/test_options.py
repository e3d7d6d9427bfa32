"""The shared generation flags: every generating command has them, with the same meaning."""

from __future__ import annotations

import pytest

from lorafit import cli

GENERATION_FLAGS = ["--max_new_tokens", "--temperature", "--top_p", "--top_k", "--repetition_penalty", "--seed", "--stop"]


@pytest.mark.parametrize("command", ["chat", "generate", "serve"])
def test_generating_commands_document_every_generation_flag(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for flag in GENERATION_FLAGS + ["--model_name_or_path", "--adapter"]:
        assert flag in text
    assert "0 means greedy" in text


def test_merge_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["merge", "--help"])
    text = capsys.readouterr().out
    for flag in ["--adapter", "--output_dir", "--dtype", "--max_shard_size", "--push_to_hub"]:
        assert flag in text


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_out_of_range_generation_flag_is_a_user_error(command, capsys):
    assert cli.main([command, "--top_p", "1.5"]) == 2
    assert "--top_p must be in (0, 1]" in capsys.readouterr().err
