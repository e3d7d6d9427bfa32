"""Adapter files round-trip with real PEFT both ways, and bad adapters fail loudly."""

import json
import warnings

import peft
import pytest
import torch

import lorafit
from model_builders import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2
from lorafit.errors import AdapterMismatchError, UserError
from lorafit.lora import lora_layers

BUILDERS = {"llama": build_tiny_llama, "qwen2": build_tiny_qwen2, "gpt2": build_tiny_gpt2}
CASES = [
    ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"target_modules": "all-linear", "modules_to_save": ["lm_head"]}),
    ("qwen2", {"target_modules": r".*\.(k_proj|up_proj)", "use_rslora": True, "r": 4, "lora_alpha": 16}),
    ("qwen2", {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}),
    ("gpt2", {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
]


def randomize(model, seed=1):
    """Non-zero adapter weights (a fresh B is zero, which would hide every bug)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def logits(model, vocab=128):
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_model(base, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))


@pytest.mark.parametrize("arch,kwargs", CASES, ids=lambda c: str(c))
def test_lorafit_adapter_loads_in_peft(tmp_path, arch, kwargs):
    ours = randomize(lorafit.add_lora(BUILDERS[arch](), lorafit.LoraConfig(**kwargs))).eval()
    lorafit.save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(BUILDERS[arch]()), logits(ours), atol=1e-3)  # the adapter does something


@pytest.mark.parametrize("arch,kwargs", CASES, ids=lambda c: str(c))
def test_peft_adapter_loads_in_lorafit(tmp_path, arch, kwargs):
    theirs = randomize(peft_model(BUILDERS[arch](), kwargs)).eval()
    theirs.save_pretrained(tmp_path)
    ours = lorafit.load_adapter(BUILDERS[arch](), tmp_path).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)


def test_saved_config_has_only_long_standing_keys(tmp_path, tiny_llama):
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules="all-linear"))
    lorafit.save_adapter(tiny_llama, tmp_path, base_model_name_or_path="/models/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) <= {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                           "modules_to_save", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
                           "base_model_name_or_path", "inference_mode"}
    assert config["base_model_name_or_path"] == "/models/base"
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_regex_is_saved_when_leaf_names_would_select_more(tmp_path, tiny_llama):
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
    lorafit.save_adapter(tiny_llama, tmp_path)
    ours = randomize(lorafit.load_adapter(build_tiny_llama(), tmp_path, trainable=True))
    assert [n for n, _ in lora_layers(ours)] == ["model.layers.0.self_attn.q_proj"]


def test_loaded_adapter_trainability(tmp_path, tiny_llama):
    lorafit.save_adapter(lorafit.add_lora(tiny_llama, lorafit.LoraConfig()), tmp_path)
    frozen = lorafit.load_adapter(build_tiny_llama(), tmp_path)
    assert lorafit.trainable_parameters(frozen)[0] == 0
    trainable = lorafit.load_adapter(build_tiny_llama(), tmp_path, trainable=True)
    assert lorafit.trainable_parameters(trainable)[0] == 2 * 2 * 8 * (32 + 32) - 2 * 8 * (32 - 16)


def test_wrong_base_shape_is_a_clear_error(tmp_path, tiny_llama):
    lorafit.save_adapter(lorafit.add_lora(tiny_llama, lorafit.LoraConfig()), tmp_path)
    wider = build_tiny_llama(hidden_size=48, intermediate_size=96, head_dim=8)
    with pytest.raises(AdapterMismatchError) as error:
        lorafit.load_adapter(wider, tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "LlamaForCausalLM" in message
    assert "shapes that do not fit" in message and "q_proj.lora_A.weight" in message
    # all or nothing: the model is left as it came in, with no wrappers, ready for the right adapter
    assert not list(lora_layers(wider)) and all(p.requires_grad for p in wider.parameters())
    right = build_tiny_llama(hidden_size=48, intermediate_size=96, head_dim=8)
    lorafit.save_adapter(lorafit.add_lora(right, lorafit.LoraConfig()), tmp_path / "right")
    assert list(lora_layers(lorafit.load_adapter(wider, tmp_path / "right")))


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file

    lorafit.save_adapter(lorafit.add_lora(tiny_llama, lorafit.LoraConfig()), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[dropped]
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError) as error:
        lorafit.load_adapter(build_tiny_llama(), tmp_path)
    assert dropped in str(error.value) and "layers.9.self_attn.q_proj" in str(error.value)


def test_unknown_keys_warn_and_unsupported_features_refuse(tmp_path, tiny_llama, caplog):
    lorafit.save_adapter(lorafit.add_lora(tiny_llama, lorafit.LoraConfig()), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "some_future_key": 3, "lora_bias": False}))
    lorafit.load_adapter(build_tiny_llama(), tmp_path)
    assert "some_future_key" in caplog.text
    config_path.write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(UserError, match="lora_bias"):
        lorafit.load_adapter(build_tiny_llama(), tmp_path)


def test_not_an_adapter_folder(tmp_path, tiny_llama):
    with pytest.raises(UserError, match="adapter_config.json"):
        lorafit.load_adapter(tiny_llama, tmp_path)
