"""Which Hugging Face causal LMs llama.cpp runs, and how their tensors are named and laid out there.

Tensor names come from the `gguf` package's own maps (`gguf.get_tensor_name_map`, built from
`gguf.MODEL_TENSORS` for the architecture): the table llama.cpp's converter uses, so no name is
typed here and a module llama.cpp has no tensor for is found, not guessed.

One layout differs. llama.cpp's Llama graph applies RoPE in its "normal" mode, which rotates
neighbouring pairs (2i, 2i+1) of each head; Hugging Face's Llama rotates the two halves (i, i + d/2).
So the rows of q_proj and k_proj are reordered per head, k with the key/value head count: forgetting
it, or reordering k with the query head count, gives a file that loads and talks nonsense (the classic
bug of home-made converters). Qwen2 runs in llama.cpp's NEOX mode, which rotates halves as Hugging
Face does, so its weights keep their order.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from lorafit.errors import UserError


class UnsupportedArchitecture(UserError):
    """The model's architecture has no llama.cpp export here."""


@dataclass(frozen=True)
class Architecture:
    hf_name: str  # config.architectures[0]
    gguf_arch: gguf.MODEL_ARCH
    reorder_rope_rows: bool  # llama.cpp rotates neighbouring pairs: q/k rows are reordered (module docstring)

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


# Mistral runs on llama.cpp's Llama graph (its converter registers MistralForCausalLM as Llama).
SUPPORTED = {
    "LlamaForCausalLM": Architecture("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, reorder_rope_rows=True),
    "MistralForCausalLM": Architecture("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, reorder_rope_rows=True),
    "Qwen2ForCausalLM": Architecture("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, reorder_rope_rows=False),
}


def architecture_of(config) -> Architecture:
    names = list(getattr(config, "architectures", None) or [])
    if not names and getattr(config, "model_type", None):  # a config built in code names no class
        names = [f"{config.model_type.capitalize()}ForCausalLM"]
    for name in names:
        if name in SUPPORTED:
            return SUPPORTED[name]
    found = names[0] if names else getattr(config, "model_type", "unknown")
    raise UnsupportedArchitecture(
        f"GGUF export supports {', '.join(SUPPORTED)} (SmolLM2 is a Llama); this model is {found}. "
        "Use `lorafit merge` for a Hugging Face folder, then llama.cpp's convert_hf_to_gguf.py if it knows the model")


class TensorNames:
    """Hugging Face parameter names -> llama.cpp tensor names, from gguf's map for the architecture."""

    def __init__(self, architecture: Architecture, config):
        self.architecture = architecture
        self.name_map = gguf.get_tensor_name_map(architecture.gguf_arch, config.num_hidden_layers)

    def find(self, hf_name: str) -> tuple[gguf.MODEL_TENSOR, str] | None:
        """(tensor kind, llama.cpp name) of a parameter such as `model.layers.0.self_attn.q_proj.weight`."""
        return self.name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))

    def require(self, hf_name: str, what: str = "tensor") -> tuple[gguf.MODEL_TENSOR, str]:
        found = self.find(hf_name)
        if found is None:
            raise UnsupportedArchitecture(
                f"{what} {hf_name} has no counterpart in llama.cpp's {self.architecture.gguf_name} model, "
                "so llama.cpp could not use it")
        return found


def reorder_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head, row 2i takes Hugging Face row i and row 2i+1 takes row i + head_dim/2.

    Works on a weight (rows x columns), a bias (rows) and LoRA's B (rows x r) alike.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of an even size")
    halves = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    return halves.transpose(1, 2).reshape(weight.shape)


def restore_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `reorder_rope_rows` (for checks that read a file back)."""
    rows = weight.shape[0]
    pairs = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return pairs.transpose(1, 2).reshape(weight.shape)


def to_llama_cpp_rows(kind: gguf.MODEL_TENSOR, rows: torch.Tensor, architecture: Architecture, config) -> torch.Tensor:
    """The rows of an output-side tensor (weight, bias, LoRA B) in llama.cpp's order for its kind."""
    if not architecture.reorder_rope_rows:
        return rows
    if kind == gguf.MODEL_TENSOR.ATTN_Q:
        return reorder_rope_rows(rows, config.num_attention_heads)
    if kind == gguf.MODEL_TENSOR.ATTN_K:
        return reorder_rope_rows(rows, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return rows


def from_llama_cpp_rows(kind: gguf.MODEL_TENSOR, rows: torch.Tensor, architecture: Architecture, config) -> torch.Tensor:
    if not architecture.reorder_rope_rows:
        return rows
    if kind == gguf.MODEL_TENSOR.ATTN_Q:
        return restore_rope_rows(rows, config.num_attention_heads)
    if kind == gguf.MODEL_TENSOR.ATTN_K:
        return restore_rope_rows(rows, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return rows
