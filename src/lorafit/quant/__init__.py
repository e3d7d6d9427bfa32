"""QLoRA: a quantized frozen base (4-bit NF4/FP4 or 8-bit) under lorafit's own LoRA layer.

`QuantizationSpec` is what the user asked for (`--quantization_bit 4 --quant_type nf4 ...`);
`lorafit.quant.bnb` turns it into bitsandbytes layers at load time and prepares the model for
training. The adapter itself stays an ordinary float adapter, saved in PEFT's layout.
"""

from lorafit.quant.spec import QUANT_TYPES, QuantizationSpec

__all__ = ["QUANT_TYPES", "QuantizationSpec"]
