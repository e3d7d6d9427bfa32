"""What quantization a user asked for, validated once (the flags' names follow LLaMA-Factory's
`quantization_bit` and PEFT/bitsandbytes' `bnb_4bit_quant_type`, `bnb_4bit_use_double_quant`,
`bnb_4bit_compute_dtype`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.errors import UserError

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class QuantizationSpec:
    """`bits` 4 or 8; for 4 bits the data type (`nf4`, the QLoRA paper's NormalFloat, or `fp4`),
    double quantization (the block scales quantized too: ~0.4 bit less per weight) and the dtype
    the dequantized weight is multiplied in."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32

    @classmethod
    def from_flags(cls, bits, quant_type: str | None = None, double_quant: bool | None = None,
                   compute_dtype: str | torch.dtype | None = None) -> QuantizationSpec | None:
        """None when no quantization was asked for; a clear error for values that make no sense."""
        if bits in (None, "", 0, "0", "none", "None"):
            for flag, value in (("--quant_type", quant_type), ("--double_quant", double_quant)):
                if value is not None:
                    raise UserError(f"{flag} sets up a quantized base: also pass --quantization_bit 4")
            return None
        try:
            bits = int(bits)
        except (TypeError, ValueError):
            raise UserError(f"--quantization_bit must be 4 or 8, got {bits!r}") from None
        if bits not in (4, 8):
            raise UserError(f"--quantization_bit must be 4 or 8, got {bits}")
        if bits == 8 and (quant_type is not None or double_quant is not None):
            raise UserError("--quant_type and --double_quant apply to 4-bit quantization; "
                            "8-bit (LLM.int8) has neither")
        quant_type = (quant_type or "nf4").lower()
        if quant_type not in QUANT_TYPES:
            raise UserError(f"--quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
        return cls(bits=bits, quant_type=quant_type, double_quant=True if double_quant is None else bool(double_quant),
                   compute_dtype=parse_compute_dtype(compute_dtype))

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit (LLM.int8)"
        return (f"4-bit {self.quant_type}{', double quantization' if self.double_quant else ''}, "
                f"computing in {str(self.compute_dtype).removeprefix('torch.')}")


def parse_compute_dtype(value: str | torch.dtype | None) -> torch.dtype:
    if value is None or value == "auto":
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    if value not in COMPUTE_DTYPES:
        raise UserError(f"--compute_dtype must be one of float32, bfloat16, float16, got {value!r}")
    return COMPUTE_DTYPES[value]
