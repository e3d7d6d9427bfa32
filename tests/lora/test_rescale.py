"""Scaling a trained update (WiSE-FT) against PEFT's rescale_adapter_scale, and its end points."""

import copy
import warnings

import peft
import pytest
import torch
from peft.helpers import rescale_adapter_scale

import lorafit
from lorafit.lora.rescale import scale_update
from model_builders import build_tiny_llama
from test_adapter_io import logits, randomize


def test_scaled_update_equals_peft_rescale_adapter_scale(tmp_path):
    config = lorafit.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], r=4, lora_alpha=8)
    ours = randomize(lorafit.add_lora(build_tiny_llama(), config)).eval()
    lorafit.save_adapter(ours, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(build_tiny_llama(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(ours), logits(reference), rtol=1e-5, atol=1e-5)
    with rescale_adapter_scale(reference, 0.6):
        expected = logits(reference)
    assert scale_update(ours, 0.6) == 7  # q, v and down in two blocks, and the embedding
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)


def test_scale_zero_is_the_base_and_modules_to_save_move_on_the_line():
    base = build_tiny_llama().eval()
    config = lorafit.LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"])
    model = randomize(lorafit.add_lora(copy.deepcopy(base), config)).eval()
    original_head = model.lm_head.original_module.weight.clone()
    trained_head = model.lm_head.trained.weight.clone()
    half = copy.deepcopy(model)
    scale_update(half, 0.5)
    torch.testing.assert_close(half.lm_head.trained.weight, (original_head + trained_head) / 2)
    scale_update(model, 0.0)
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"use_dora": True}, "DoRA"),
    ({"init_lora_weights": "olora"}, "PiSSA/OLoRA"),
])
def test_adapters_that_scaling_would_not_lead_back_to_the_base_are_refused(kwargs, message):
    model = lorafit.add_lora(build_tiny_llama(), lorafit.LoraConfig(target_modules=["q_proj"], **kwargs))
    with pytest.raises(ValueError, match=message):
        scale_update(model, 0.5)


def test_a_merged_adapter_is_refused():
    model = randomize(lorafit.add_lora(build_tiny_llama(), lorafit.LoraConfig(target_modules=["q_proj"])))
    lorafit.merge_lora(model, keep_wrappers=True)
    with pytest.raises(ValueError, match="unmerge"):
        scale_update(model, 0.5)
