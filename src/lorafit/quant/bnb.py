"""The quantized base through bitsandbytes: its layers, loading config and training preparation.

Why bitsandbytes: it is what QLoRA, PEFT, LLaMA-Factory and unsloth use, transformers quantizes a
model with it at load time (each linear layer is quantized as it is loaded, so no full-precision
copy of the model is ever held; `lorafit.quant.load` also lets each weight's file pages go once
packed), and current releases run on the CPU as well as on CUDA. On the
development CPU (AVX2, no AVX-512) its 4-bit NF4 linear runs at about the speed of the float32 one
(dequantize, then a float32 GEMM), and its 8-bit linear slightly slower (LLM.int8 casts to fp16).
torchao's NF4 tensor is the other maintained choice; `docs/train.md` (QLoRA) has the comparison.

A quantized layer keeps its packed weight (`Params4bit`: two 4-bit codes per byte plus one scale
per 64 weights; `Int8Params`: one int8 per weight plus one scale per row) and dequantizes it
inside its forward pass. lorafit's `LoraLinear` wraps it like any linear layer, since it calls
`base_layer(x)` and adds `scaling * B A dropout(x)`; merging into quantized weights is refused
(the result would be re-quantized and lose the update): `lorafit merge` merges into the
full-precision base instead.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lorafit.errors import UserError
from lorafit.quant.spec import QuantizationSpec

logger = logging.getLogger(__name__)

EXTRA = "pip install 'lorafit[qlora]'"


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(f"--quantization_bit needs the bitsandbytes library: {EXTRA}") from None
    return bitsandbytes


def check_device(device: torch.device | str) -> None:
    if device == "auto":
        return
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda", "xpu"):
        raise UserError(f"--quantization_bit: bitsandbytes runs on cpu, cuda and xpu, not on {kind}")


def device_map_for(device: torch.device) -> dict:
    """bitsandbytes quantizes on the device the weights load to: the whole model onto `device`
    (a CUDA device by its index, as transformers' device maps name them)."""
    return {"": device.index or 0} if device.type == "cuda" else {"": str(device)}


def quantization_config(spec: QuantizationSpec):
    """transformers' `BitsAndBytesConfig` for `spec` (quantization happens as the weights load)."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=spec.double_quant,
                              bnb_4bit_compute_dtype=spec.compute_dtype)


def is_quantized_linear(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """A packed bitsandbytes weight (what a quantized layer's `.weight` holds)."""
    return type(weight).__name__ in ("Params4bit", "Int8Params") or not weight.dtype.is_floating_point


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float32 (out x in) weight a quantized layer computes with: the reference for tests and
    for code that needs the weight itself (never kept for the whole model)."""
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if type(weight).__name__ == "Int8Params":
        return weight.data.float() * weight.SCB.float()[:, None] / 127.0
    return weight.float()


def quantized_layer_count(model: nn.Module) -> int:
    return sum(1 for module in model.modules() if is_quantized_linear(module))


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """What PEFT's `prepare_model_for_kbit_training` does, lorafit's way: freeze every base
    parameter and hold the unquantized ones (embeddings, norms, the output head) in float32, so
    the small tensors that are not quantized lose nothing to half precision. Gradient
    checkpointing, if asked for, is set up by `enable_gradient_checkpointing` as without
    quantization (its input embeddings require grad so the checkpointed blocks get gradients)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
        if parameter.dtype in (torch.float16, torch.bfloat16) and not is_quantized_weight(parameter):
            parameter.data = parameter.data.float()
    return model


def bytes_of_parameters(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers as stored (packed weights count as packed)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:  # the 4-bit block scales
            absmax = getattr(state, "absmax", None)
            total += absmax.numel() * absmax.element_size() if absmax is not None else 0
        scales = getattr(tensor, "SCB", None)
        if scales is not None:
            total += scales.numel() * scales.element_size()
    return total
