"""User mistakes: each is one message on stderr, exit code 2, no traceback, through the real CLI
(`python -m lorafit ...`); `--debug` or LORAFIT_DEBUG=1 shows the traceback."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lorafit
from model_builders import build_tiny_gpt2, build_tiny_llama
from reliability_helpers import lorafit_command, subprocess_env
from test_safe_loading import RunsCodeWhenUnpickled


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, tiny_model_dir, identity_files):
    """(name, argv, a phrase the message must contain)."""
    folder = tmp_path_factory.mktemp("mistakes")
    train, _ = identity_files
    missing = str(folder / "missing.jsonl")
    bad_yaml = folder / "run.yaml"
    bad_yaml.write_text("learning_rate: [1e-4\n")
    pickle_adapter = folder / "pickle-adapter"
    lorafit.save_adapter(lorafit.add_lora(build_tiny_llama(), lorafit.LoraConfig()), pickle_adapter)
    tensors = lorafit.lora.adapter_io.read_adapter_tensors(pickle_adapter)
    (pickle_adapter / "adapter_model.safetensors").unlink()
    torch.save({**tensors, "x": RunsCodeWhenUnpickled(folder / "ran")}, pickle_adapter / "adapter_model.bin")
    gpt2_adapter = folder / "gpt2-adapter"
    lorafit.save_adapter(lorafit.add_lora(build_tiny_gpt2(), lorafit.LoraConfig(target_modules="all-linear")), gpt2_adapter)
    model = ["--model_name_or_path", tiny_model_dir]
    quick = [*model, "--train_file", str(train), "--output_dir", str(folder / "out"), "--max_steps", "1"]
    return [
        ("unknown command", ["trian"], "did you mean 'train'"),
        ("misspelled flag", ["train", *quick, "--learning_rat", "1e-4"], "--learning_rate"),
        ("bad flag value", ["train", *quick, "--learning_rate", "fast"], "learning_rate"),
        ("out-of-range rank", ["train", *quick, "--lora_rank", "0"], "--lora_rank"),
        ("bad non-finite limit", ["train", *quick, "--max_nonfinite_steps", "0"], "--max_nonfinite_steps"),
        ("broken YAML", ["train", str(bad_yaml)], "not valid YAML"),
        ("missing data file", ["train", *model, "--train_file", missing, "--output_dir", str(folder / "o2")],
         "missing.jsonl"),
        ("missing model folder", ["train", "--model_name_or_path", str(folder / "no-model"), "--train_file",
                                  str(train), "--output_dir", str(folder / "o3")], "no-model"),
        ("not a checkpoint", ["train", *quick, "--resume_from_checkpoint", str(folder)], "not a checkpoint"),
        ("pickle payload adapter", ["chat", *model, "--adapter", str(pickle_adapter)], "adapter_model.bin"),
        ("adapter for another model", ["chat", *model, "--adapter", str(gpt2_adapter)], "matched no linear module"),
        ("sampling out of range", ["chat", *model, "--temperature", "-1"], "temperature"),
        ("missing prompts file", ["generate", *model, "--input", missing, "--output", str(folder / "a.jsonl")],
         "missing.jsonl"),
        ("missing inspect file", ["data", "inspect", "--train_file", missing], "missing.jsonl"),
    ]


def run_cli(argv, **env):
    return subprocess.run(lorafit_command(*argv), capture_output=True, text=True, input="hello\n",
                          env=subprocess_env(**env), timeout=300)


def test_every_mistake_is_one_message_exit_2_and_no_traceback(mistakes):
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: run_cli(case[1]), mistakes))
    failures = []
    for (name, argv, phrase), result in zip(mistakes, results):
        if result.returncode != 2 or "Traceback" in result.stderr or phrase not in result.stderr:
            failures.append(f"{name}: exit {result.returncode}\n{result.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(how):
    argv = ["--debug", "train", "--lora_rank", "0"] if how == "flag" else ["train", "--lora_rank", "0"]
    result = run_cli(argv, **({"LORAFIT_DEBUG": "1"} if how == "environment" else {}))
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "--lora_rank must be a positive integer" in result.stderr
