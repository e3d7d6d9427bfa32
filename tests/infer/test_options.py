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


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", str(2**64), "--seed must be an integer between -2**63 and 2**64 - 1"),
    ("--repetition_penalty", "1e-30", "--repetition_penalty must be between 0.01 and 100"),
])
def test_values_torch_cannot_take_are_user_errors(flag, value, message, capsys):
    assert cli.main(["chat", flag, value]) == 2
    assert message in capsys.readouterr().err


def test_a_vanishing_temperature_is_greedy():
    from lorafit.infer.options import GenerationOptions

    assert GenerationOptions(temperature=1e-30).validate().greedy
    assert not GenerationOptions(temperature=0.1).validate().greedy


def test_an_unavailable_device_is_a_user_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["chat", "--device", "cuda"]) == 2
    assert "--device cuda: this machine has 0 usable CUDA device(s)" in capsys.readouterr().err


def test_a_port_out_of_range_is_a_user_error(capsys):
    assert cli.main(["serve", "--port", "70000"]) == 2
    assert "--port must be between 0" in capsys.readouterr().err


def test_an_adapter_whose_base_folder_is_elsewhere_asks_for_the_base(tmp_path, capsys):
    import json

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
         "base_model_name_or_path": "/home/someone/models/base"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert cli.main(["chat", "--adapter", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert "/home/someone/models/base, which is not on this machine" in err and "--model_name_or_path" in err
