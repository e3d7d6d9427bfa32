"""The quantization formats the tests run through: 4-bit NF4 (double-quantized), 4-bit FP4, 8-bit."""

from lorafit.quant import QuantizationSpec

SPECS = {"nf4": QuantizationSpec(bits=4), "fp4": QuantizationSpec(bits=4, quant_type="fp4", double_quant=False),
         "int8": QuantizationSpec(bits=8)}
