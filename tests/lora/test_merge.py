"""Merging folds adapters into plain weights; a reversible merge restores them bit for bit."""

import pytest
import torch

import lorafit
from model_builders import build_tiny_gpt2, build_tiny_llama
from lorafit.lora import LoraLinear, ModulesToSave
from test_adapter_io import logits, randomize


@pytest.mark.parametrize("builder,kwargs", [
    (build_tiny_llama, {"target_modules": "all-linear", "modules_to_save": ["lm_head"]}),
    (build_tiny_gpt2, {"target_modules": ["c_attn", "c_fc"]}),
])
def test_merge_matches_adapter_and_returns_a_plain_model(builder, kwargs):
    model = randomize(lorafit.add_lora(builder(), lorafit.LoraConfig(**kwargs))).eval()
    expected = logits(model)
    merged = lorafit.merge_lora(model)
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in merged.modules())
    assert type(merged) is type(builder())
    assert set(merged.state_dict()) == set(builder().state_dict())
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=0)


def test_unmerge_restores_base_weights_bit_for_bit():
    model = randomize(lorafit.add_lora(build_tiny_llama().to(torch.bfloat16),
                                       lorafit.LoraConfig(target_modules="all-linear"))).eval()
    originals = {n: l.base_layer.weight.clone() for n, l in model.named_modules() if isinstance(l, LoraLinear)}
    adapter_out = logits(model)
    lorafit.merge_lora(model, keep_wrappers=True)
    assert any(not torch.equal(l.base_layer.weight, originals[n]) for n, l in model.named_modules() if isinstance(l, LoraLinear))
    torch.testing.assert_close(logits(model), adapter_out, atol=0.1, rtol=0.05)  # bf16 rounding of W + dW
    lorafit.unmerge_lora(model)
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLinear):
            assert torch.equal(layer.base_layer.weight, originals[name])
    assert torch.equal(logits(model), adapter_out)
