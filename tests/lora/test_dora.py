"""DoRA against real PEFT: outputs, gradients, files both ways, merge and unmerge."""

import copy
import warnings

import peft
import pytest
import torch

import lorafit
from lorafit.lora import LoraLinear, lora_layers
from model_builders import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2
from test_adapter_io import logits, peft_model, randomize

CASES = [
    (build_tiny_llama, {"target_modules": "all-linear"}),
    (build_tiny_qwen2, {"target_modules": ["q_proj", "k_proj", "v_proj"], "r": 4, "use_rslora": True}),  # biases
    (build_tiny_gpt2, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),                   # Conv1D
]
IDS = ["llama", "qwen2-bias-rslora", "gpt2-conv1d"]


def randomize_dora(model, seed=1):
    """Random A and B, and a magnitude near the weight norm (as after training)."""
    randomize(model, seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.copy_(param.abs() + 1.0)
    return model


@pytest.mark.parametrize("builder,kwargs", CASES, ids=IDS)
def test_dora_adapter_loads_in_peft_and_back(tmp_path, builder, kwargs):
    ours = randomize_dora(lorafit.add_lora(builder(), lorafit.LoraConfig(use_dora=True, **kwargs))).eval()
    lorafit.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(builder(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(builder()), logits(ours), atol=1e-3)

    peft_made = randomize_dora(peft_model(builder(), {"use_dora": True, **kwargs})).eval()
    peft_made.save_pretrained(tmp_path / "theirs")
    loaded = lorafit.load_adapter(builder(), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(loaded), logits(peft_made), atol=1e-5, rtol=0)


@pytest.mark.parametrize("builder,kwargs", CASES[:2], ids=IDS[:2])
def test_dora_gradients_match_peft_with_the_norm_detached(builder, kwargs):
    base, kwargs = builder(), {"use_dora": True, "lora_dropout": 0.0, "lora_alpha": 16, **kwargs}
    theirs = randomize_dora(peft_model(copy.deepcopy(base), kwargs))
    ours = lorafit.add_lora(base, lorafit.LoraConfig(**kwargs))
    ours_params = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            key = name.replace("base_model.model.", "").replace(".default.weight", "").replace(".default", "")
            key = key if key in ours_params else key + ".weight"
            ours_params[key].data.copy_(param.data)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    theirs.train(), ours.train()
    theirs(input_ids=ids, labels=ids).loss.backward()
    ours(input_ids=ids, labels=ids).loss.backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(theirs_grads) == len([p for p in ours.parameters() if p.requires_grad])
    for name, grad in theirs_grads.items():
        key = name.replace("base_model.model.", "").replace(".default.weight", "").replace(".default", "")
        key = key if key in ours_params else key + ".weight"
        torch.testing.assert_close(ours_params[key].grad, grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fresh_dora_is_the_base_model_and_its_magnitude_is_the_weight_norm(tiny_qwen2):
    expected = logits(tiny_qwen2)
    lorafit.add_lora(tiny_qwen2, lorafit.LoraConfig(target_modules="all-linear", use_dora=True))
    torch.testing.assert_close(logits(tiny_qwen2), expected, atol=1e-6, rtol=0)
    layer = tiny_qwen2.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))


@pytest.mark.parametrize("builder,kwargs", CASES, ids=IDS)
def test_dora_merge_matches_the_adapter_and_unmerges_exactly(builder, kwargs):
    ours = randomize_dora(lorafit.add_lora(builder(), lorafit.LoraConfig(use_dora=True, **kwargs))).eval()
    adapter_out = logits(ours)
    originals = {n: l.base_layer.weight.clone() for n, l in lora_layers(ours)}
    lorafit.merge_lora(ours, keep_wrappers=True)
    torch.testing.assert_close(logits(ours), adapter_out, atol=1e-5, rtol=0)
    lorafit.unmerge_lora(ours)
    assert all(torch.equal(l.base_layer.weight, originals[n]) for n, l in lora_layers(ours))
    assert torch.equal(logits(ours), adapter_out)

    merged = lorafit.merge_lora(ours)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged), adapter_out, atol=1e-5, rtol=0)


def test_dora_merge_equals_peft_merge_and_unload(tmp_path, tiny_llama):
    ours = randomize_dora(lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules="all-linear",
                                                                          use_dora=True))).eval()
    lorafit.save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build_tiny_llama(), tmp_path).merge_and_unload()
    merged = lorafit.merge_lora(ours)
    for (name, mine), (_, reference) in zip(merged.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(mine, reference, atol=1e-6, rtol=1e-5, msg=name)


def test_dora_in_bfloat16_keeps_the_activation_dtype(tiny_llama):
    tiny_llama.to(torch.bfloat16)
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules=["q_proj"], use_dora=True))
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    assert layer.lora_magnitude_vector.dtype == torch.float32
    out = layer(torch.randn(2, 3, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
