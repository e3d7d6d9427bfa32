"""The layer itself: identity at init, the documented formula, freezing, errors, checkpointing."""

import pytest
import torch

import lorafit
from lorafit.errors import TargetModulesError
from lorafit.lora import LoraLinear, lora_layers


def test_fresh_adapter_is_the_identity(tiny_llama):
    ids = torch.randint(0, 128, (2, 9))
    before = tiny_llama(ids).logits
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules="all-linear"))
    assert torch.equal(tiny_llama(ids).logits, before)


def test_forward_is_w_x_plus_scaled_b_a_x():
    base = torch.nn.Linear(16, 12)
    layer = LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 16)
    expected = base(x) + (8 / 4) * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected)


def test_rslora_and_gaussian_init():
    config = lorafit.LoraConfig(r=16, lora_alpha=8, use_rslora=True, init_lora_weights="gaussian")
    assert config.scaling == pytest.approx(8 / 4)
    layer = LoraLinear(torch.nn.Linear(64, 64), r=16, lora_alpha=8, scaling=config.scaling, init_lora_weights="gaussian")
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.2)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_only_adapters_train(tiny_llama):
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    trainable = {name for name, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert len([n for n in trainable if "lora_A" in n]) == 4  # 2 layers x (q, v)


def test_no_match_lists_the_linear_module_names(tiny_llama):
    with pytest.raises(TargetModulesError, match=r"q_proj.*v_proj|gate_proj"):
        lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules=["query_key_value"]))


def test_all_linear_skips_the_output_head(tiny_llama, tiny_gpt2):
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules="all-linear"))
    names = [name for name, _ in lora_layers(tiny_llama)]
    assert len(names) == 14 and "lm_head" not in names
    lorafit.add_lora(tiny_gpt2, lorafit.LoraConfig(target_modules="all-linear"))
    assert {n.rsplit(".", 1)[-1] for n, _ in lora_layers(tiny_gpt2)} == {"c_attn", "c_proj", "c_fc"}


def test_half_precision_base_keeps_activations_in_their_dtype(tiny_llama):
    tiny_llama.to(torch.bfloat16)
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules=["q_proj"]))
    layer = next(layer for _, layer in lora_layers(tiny_llama))
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    out = layer(torch.randn(2, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_reaches_only_adapters(tiny_llama, use_reentrant):
    tiny_llama.train()
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                    init_lora_weights=False))
    lorafit.enable_gradient_checkpointing(tiny_llama, use_reentrant=use_reentrant)
    assert tiny_llama.config.use_cache is False
    ids = torch.randint(0, 128, (2, 8))
    tiny_llama(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in tiny_llama.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in with_grad) and len(with_grad) == 8
    assert all(p.grad.abs().sum() > 0 for n, p in tiny_llama.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_replays_the_dropout_masks(tiny_llama, use_reentrant):
    """The recomputed forward draws the same masks (their bits descend from torch's RNG, which checkpointing replays)."""
    import copy

    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules="all-linear", lora_dropout=0.3, init_lora_weights=False))
    tiny_llama.train()
    checkpointed = copy.deepcopy(tiny_llama)
    lorafit.enable_gradient_checkpointing(checkpointed, use_reentrant=use_reentrant)
    ids = torch.randint(0, 128, (2, 8))
    grads = []
    for model in (tiny_llama, checkpointed):
        torch.manual_seed(7)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
