"""Safe loading, part two (promise 6): a model's own Python code runs only with --trust_remote_code,
in every command that loads a model or tokenizer, and a file named in a config file is never read
from outside its folder.

The remote-code model is the tiny test model whose config and tokenizer config point (`auto_map`)
at Python files in the folder; importing any of them leaves a marker file, so "not run" is
checked, not assumed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

import lorafit
from lorafit.errors import UserError
from lorafit.infer.loading import load_inference_tokenizer
from lorafit.models import RemoteCodeRefused, UnsafeFileReference, load_model, load_tokenizer
from reliability_helpers import lorafit_command, subprocess_env

CONFIGURATION_CODE = '''
import pathlib
pathlib.Path({marker!r}).write_text("configuration code ran")
from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "lorafit_custom"
'''
MODELING_CODE = '''
from transformers import LlamaForCausalLM
from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''
TOKENIZATION_CODE = '''
import pathlib
pathlib.Path({marker!r}).write_text("tokenizer code ran")
from transformers import PreTrainedTokenizerFast


class CustomTokenizerFast(PreTrainedTokenizerFast):
    pass
'''


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def remote_code_copy(tiny_model_dir, folder):
    """A copy of the tiny model that needs its own code for the config, the model and the tokenizer;
    returns (folder, the markers its code leaves when it runs)."""
    shutil.copytree(tiny_model_dir, folder)
    markers = [folder.parent / f"{folder.name}-configuration-ran", folder.parent / f"{folder.name}-tokenizer-ran"]
    (folder / "configuration_custom.py").write_text(CONFIGURATION_CODE.format(marker=str(markers[0])))
    (folder / "modeling_custom.py").write_text(MODELING_CODE)
    (folder / "tokenization_custom.py").write_text(TOKENIZATION_CODE.format(marker=str(markers[1])))
    edit_json(folder / "config.json", model_type="lorafit_custom", architectures=["CustomForCausalLM"],
              auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    edit_json(folder / "tokenizer_config.json", tokenizer_class="CustomTokenizerFast",
              auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizerFast"]})
    return folder, markers


@pytest.fixture(scope="module")
def remote_model(tmp_path_factory, tiny_model_dir):
    return remote_code_copy(tiny_model_dir, tmp_path_factory.mktemp("remote") / "model")


def test_loading_refuses_remote_code_in_one_line_unless_asked(tmp_path, tiny_model_dir):
    folder, markers = remote_code_copy(tiny_model_dir, tmp_path / "model")
    for load in (load_tokenizer, load_model):
        with pytest.raises(RemoteCodeRefused) as error:
            load(str(folder))
        message = str(error.value)
        assert "\n" not in message and str(folder) in message and "--trust_remote_code" in message
        assert error.value.__cause__ is None and error.value.__suppress_context__
    assert not any(marker.exists() for marker in markers)
    model = load_model(str(folder), trust_remote_code=True)  # asked: the folder's own classes load
    assert type(model).__name__ == "CustomForCausalLM" and markers[0].exists()
    assert type(load_tokenizer(str(folder), trust_remote_code=True)).__name__ == "CustomTokenizerFast"
    assert markers[1].exists()


def run_cli(argv, stdin=b"Hello\n"):
    return subprocess.run(lorafit_command(*argv), input=stdin, capture_output=True, env=subprocess_env(),
                          timeout=300)


def test_no_command_runs_a_models_code_without_the_flag(tmp_path, remote_model, identity_files):
    folder, markers = remote_model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    adapter = tmp_path / "adapter"
    lorafit.save_adapter(lorafit.add_lora(standard_llama_like(folder), lorafit.LoraConfig()), adapter)
    model = ["--model_name_or_path", str(folder)]
    commands = {
        "train": ["train", *model, "--train_file", str(identity_files[0]), "--output_dir", str(tmp_path / "run"),
                  "--max_steps", "1"],
        "data inspect": ["data", "inspect", *model, "--train_file", str(identity_files[0])],
        "chat": ["chat", *model, "--max_new_tokens", "2"],
        "generate": ["generate", *model, "--input", str(prompts), "--output", str(tmp_path / "answers.jsonl")],
        "merge": ["merge", *model, "--adapter", str(adapter), "--output_dir", str(tmp_path / "merged")],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(commands, pool.map(run_cli, commands.values())))
    failures = []
    for name, result in results.items():
        stderr = result.stderr.decode("utf-8", "replace")
        errors = [line for line in stderr.splitlines() if line.startswith(f"lorafit {name.split()[0]}: error:")]
        if result.returncode != 2 or "Traceback" in stderr or len(errors) != 1 or "--trust_remote_code" not in errors[0]:
            failures.append(f"{name}: exit {result.returncode}\n{stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert not any(marker.exists() for marker in markers)
    assert not (tmp_path / "answers.jsonl").exists() and not (tmp_path / "merged").exists()


def standard_llama_like(folder):
    """The tiny model's weights under the standard Llama class (no remote code), for an adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("auto_map", "architectures", "model_type")}
    return LlamaForCausalLM(LlamaConfig(**config))


def test_the_flag_lets_the_commands_run_the_models_code(tmp_path, tiny_model_dir):
    folder, markers = remote_code_copy(tiny_model_dir, tmp_path / "model")
    result = run_cli(["chat", "--model_name_or_path", str(folder), "--max_new_tokens", "2", "--trust_remote_code"])
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert all(marker.exists() for marker in markers)


OUTSIDE_REFERENCES = [("vocab_file", "../../../../etc/passwd"), ("tokenizer_file", "/etc/passwd"),
                      ("merges_file", "../outside/merges.txt")]


@pytest.mark.parametrize("key, value", OUTSIDE_REFERENCES)
def test_a_tokenizer_config_naming_a_file_outside_its_folder_is_refused(tmp_path, tiny_model_dir, key, value):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    edit_json(folder / "tokenizer_config.json", **{key: value})
    with pytest.raises(UnsafeFileReference) as error:
        load_tokenizer(str(folder))
    assert "\n" not in str(error.value) and key in str(error.value) and "outside the folder" in str(error.value)


def test_metadata_paths_and_files_inside_the_folder_still_load(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    # what old tokenizer configs carry: the uploader's absolute paths as metadata, never opened
    edit_json(folder / "tokenizer_config.json", special_tokens_map_file="/home/someone/special_tokens_map.json",
              tokenizer_file="tokenizer.json")
    assert len(load_tokenizer(str(folder))) == len(load_tokenizer(tiny_model_dir))


def test_an_adapter_folder_tokenizer_cannot_reach_outside_either(tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    lorafit.save_adapter(lorafit.add_lora(load_model(tiny_model_dir), lorafit.LoraConfig()), adapter,
                         base_model_name_or_path=tiny_model_dir)
    load_tokenizer(tiny_model_dir).save_pretrained(adapter)
    edit_json(adapter / "tokenizer_config.json", vocab_file=str(tmp_path / "elsewhere" / "vocab.json"))
    with pytest.raises(UnsafeFileReference, match="vocab_file"):
        load_inference_tokenizer(tiny_model_dir, adapter)
    result = run_cli(["chat", "--adapter", str(adapter), "--max_new_tokens", "2"])
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in stderr and "points outside the folder" in stderr


def test_an_adapter_naming_a_base_that_is_no_model_is_one_line(tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    lorafit.save_adapter(lorafit.add_lora(load_model(tiny_model_dir), lorafit.LoraConfig()), adapter,
                         base_model_name_or_path="../../../../etc")
    with pytest.raises(UserError) as error:
        from lorafit.infer.loading import load_for_inference

        load_for_inference(adapter=str(adapter))
    assert "\n" not in str(error.value)
