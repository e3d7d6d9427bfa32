"""QLoRA: lorafit's LoRA layer over a bitsandbytes 4-bit / 8-bit base, checked against the
dequantized reference and against real PEFT on the same quantized base."""

import sys
import warnings

import pytest
import torch

import lorafit
from lorafit.errors import UserError
from lorafit.lora import LoraConfig, add_lora, merge_lora
from lorafit.models import load_model
from lorafit.quant import QuantizationSpec
from quant_specs import SPECS

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA tests need the qlora extra (bitsandbytes)")
from lorafit.quant.bnb import (  # noqa: E402
    dequantized_weight,
    is_quantized_linear,
    prepare_for_kbit_training,
    quantized_layer_count,
    require_bitsandbytes,
)

def quantized(base_dir, kind: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_for_kbit_training(load_model(base_dir, quantization=SPECS[kind]))


def tokens(seed: int = 0):
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_flags_are_validated():
    assert QuantizationSpec.from_flags(None) is None
    spec = QuantizationSpec.from_flags("4", compute_dtype="bf16")
    assert (spec.bits, spec.quant_type, spec.double_quant, spec.compute_dtype) == (4, "nf4", True, torch.bfloat16)
    for bad, message in [(dict(bits=3), "must be 4 or 8"), (dict(bits="four"), "must be 4 or 8"),
                         (dict(bits=4, quant_type="int4"), "nf4, fp4"),
                         (dict(bits=8, quant_type="nf4"), "apply to 4-bit"),
                         (dict(bits=None, double_quant=True), "also pass --quantization_bit"),
                         (dict(bits=4, compute_dtype="float64"), "--compute_dtype")]:
        with pytest.raises(UserError, match=message):
            QuantizationSpec.from_flags(**bad)


@pytest.mark.parametrize("kind", SPECS)
def test_quantized_layers_compute_with_their_dequantized_weight(base_dir, kind):
    model = quantized(base_dir, kind)
    reference = load_model(base_dir)
    layers = {name: module for name, module in model.named_modules() if is_quantized_linear(module)}
    assert len(layers) == quantized_layer_count(model) == 2 * 7  # every linear but the output head
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    for name, layer in layers.items():
        dequantized = dequantized_weight(layer)
        original = reference.get_submodule(name).weight
        x_in = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2)) if layer.in_features != 64 else x
        with torch.no_grad():
            out, expected = layer(x_in).float(), x_in @ dequantized.t()
        # 4-bit: dequantize, then a float32 GEMM (the same numbers), except on CPUs with AVX512-BF16,
        # where bitsandbytes' inference kernel computes in bfloat16; LLM.int8 also rounds the input to int8.
        bf16_kernel = getattr(layer, "support_avx512bf16_for_cpu", False)
        tolerance = 3e-2 if kind == "int8" else 1e-2 if bf16_kernel else 1e-5
        assert (out - expected).norm() / expected.norm() < tolerance, name
        # and the quantized weight is the original within the format's error
        error = ((dequantized - original).norm() / original.norm()).item()
        assert error < {"nf4": 0.12, "fp4": 0.2, "int8": 0.01}[kind], (name, error)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_gradients_reach_only_the_adapter(base_dir, kind):
    model = quantized(base_dir, kind)
    # no dropout: the loss before and after the step differ by the step alone, not by two masks
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    optimizer.step()
    assert all(torch.equal(p.detach(), frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert model(input_ids=ids, labels=ids).loss < loss  # and a step on the adapter lowers the loss


def test_adapter_is_float32_while_the_base_is_packed(base_dir):
    model = quantized(base_dir, "nf4")
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32 and not layer.base_layer.weight.dtype.is_floating_point


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lorafit_adapter_loads_in_peft_on_the_quantized_and_the_full_base(base_dir, kind, tmp_path):
    from peft import PeftModel

    ours = quantized(base_dir, kind)
    add_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    lorafit.save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=base_dir)
    ids = tokens(3)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(quantized(base_dir, kind), tmp_path / "adapter").eval()
        assert torch.allclose(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        # The files are ordinary adapter files: on the full-precision base they apply as trained,
        # up to the quantization error of the base.
        full = PeftModel.from_pretrained(load_model(base_dir), tmp_path / "adapter").eval()
        drift = (full(input_ids=ids).logits - expected).abs().max().item()
    assert drift < (0.5 if kind == "nf4" else 0.1)


def test_peft_qlora_adapter_loads_in_lorafit(base_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(quantized(base_dir, "nf4"), PeftLoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorafit.load_adapter(quantized(base_dir, "nf4"), tmp_path / "peft")
    ids = tokens(4)
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_merging_into_quantized_weights_is_refused(base_dir):
    model = quantized(base_dir, "nf4")
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(UserError, match="full-precision base"):
        merge_lora(model)


def test_variants_that_need_the_weight_are_refused_on_a_quantized_base(base_dir):
    for config in (dict(use_dora=True), dict(init_lora_weights="pissa")):
        with pytest.raises(UserError, match="quantized"):
            add_lora(quantized(base_dir, "nf4"), LoraConfig(r=4, target_modules=["q_proj"], **config))


def test_missing_library_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match=r"lorafit\[qlora\]"):
        require_bitsandbytes()


def test_a_device_bitsandbytes_cannot_run_on_is_refused_before_loading(base_dir):
    spec = QuantizationSpec.from_flags(4)
    with pytest.raises(UserError, match="bitsandbytes runs on cpu, cuda and xpu, not on mps"):
        load_model(base_dir, quantization=spec, device_map={"": "mps"})
