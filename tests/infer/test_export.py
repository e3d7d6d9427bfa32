"""`lorafit merge`: the merged folder loads in plain transformers and reproduces base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import lorafit
from lorafit import cli
from lorafit.data.templates import ALPACA_TEMPLATE, set_chat_template
from lorafit.models import load_model, load_tokenizer

PROBE = [[1, 250, 3000, 17, 42, 9000, 5, 2]]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A random, non-zero adapter over every linear layer, saved with its (alpaca) training tokenizer."""
    model = load_model(tiny_model_dir)
    lorafit.add_lora(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # B = 0 at init would make the adapter a no-op
    folder = tmp_path_factory.mktemp("adapter")
    lorafit.save_adapter(model, folder, base_model_name_or_path=tiny_model_dir)
    set_chat_template(load_tokenizer(tiny_model_dir), "alpaca").save_pretrained(folder)
    return folder


@torch.inference_mode()
def unmerged_logits(base_dir, adapter):
    model = lorafit.load_adapter(load_model(base_dir), adapter).eval()
    return model(torch.tensor(PROBE)).logits


def merge(base_dir, adapter, output, *flags):
    return cli.main(["merge", "--model_name_or_path", base_dir, "--adapter", str(adapter),
                     "--output_dir", str(output), *flags])


def test_merged_folder_is_a_plain_transformers_model_with_equal_logits(tiny_model_dir, adapter_dir, tmp_path, capsys):
    output = tmp_path / "merged"
    assert merge(tiny_model_dir, adapter_dir, output, "--dtype", "float32") == 0
    assert "merge check" in capsys.readouterr().err

    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    assert type(merged) is LlamaForCausalLM and merged.dtype == torch.float32
    with torch.inference_mode():
        merged_logits = merged(torch.tensor(PROBE)).logits
    reference = unmerged_logits(tiny_model_dir, adapter_dir)
    assert (reference - load_model(tiny_model_dir)(torch.tensor(PROBE)).logits).abs().max() > 1e-2  # adapter matters
    assert torch.allclose(merged_logits, reference, atol=1e-4, rtol=0)

    with safe_open(str(output / "model.safetensors"), "pt") as weights:
        assert not any("lora" in key for key in weights.keys())
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template == ALPACA_TEMPLATE  # the adapter's training template, not the base's ChatML
    generation = json.loads((output / "generation_config.json").read_text())
    assert tokenizer.convert_ids_to_tokens(generation["eos_token_id"] if isinstance(generation["eos_token_id"], int)
                                           else generation["eos_token_id"][0]) == "<|im_end|>"
    assert generation["pad_token_id"] == tokenizer.pad_token_id


def test_bfloat16_export_and_sharding(tiny_model_dir, adapter_dir, tmp_path):
    output = tmp_path / "merged-bf16"
    assert merge(tiny_model_dir, adapter_dir, output, "--dtype", "bfloat16", "--max_shard_size", "1MB") == 0
    assert (output / "model.safetensors.index.json").is_file()
    assert len(list(output.glob("model-*.safetensors"))) > 1
    merged = AutoModelForCausalLM.from_pretrained(output)
    assert merged.dtype == torch.bfloat16


def test_a_wrong_merge_is_caught_and_nothing_is_written(tiny_model_dir, adapter_dir, tmp_path, monkeypatch, capsys):
    import lorafit.infer.export as export

    def broken_merge(model):
        lorafit.merge_lora(model)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)  # a merge that gets one layer wrong
        return model

    monkeypatch.setattr(export, "merge_lora", broken_merge)
    output = tmp_path / "merged"
    assert merge(tiny_model_dir, adapter_dir, output) == 2
    assert "does not reproduce base + adapter" in capsys.readouterr().err
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_push_to_hub_offline_is_a_clear_error_before_any_work(adapter_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["merge", "--model_name_or_path", str(tmp_path / "missing"), "--adapter", str(adapter_dir),
                     "--output_dir", str(tmp_path / "out"), "--push_to_hub", "me/merged"])
    err = capsys.readouterr().err
    assert code == 2 and "HF_HUB_OFFLINE" in err and "--push_to_hub me/merged" in err


def test_non_empty_output_dir_needs_overwrite(tiny_model_dir, adapter_dir, tmp_path, capsys):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert merge(tiny_model_dir, adapter_dir, output) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err and (output / "keep.txt").exists()


def test_output_dir_that_is_the_adapter_or_a_file_is_refused(tiny_model_dir, adapter_dir, tmp_path, capsys):
    assert merge(tiny_model_dir, adapter_dir, adapter_dir, "--overwrite_output_dir") == 2
    assert "would delete its input" in capsys.readouterr().err
    assert (adapter_dir / "adapter_model.safetensors").exists()
    a_file = tmp_path / "merged.txt"
    a_file.write_text("mine")
    assert merge(tiny_model_dir, adapter_dir, a_file) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "mine"


def test_probe_drops_the_system_message_when_the_template_refuses_it(tiny_model_dir):
    from lorafit.infer.export import render_probe

    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    text = tokenizer.decode(render_probe(tokenizer))
    assert "system" not in text and text.rstrip().endswith("assistant:")
