"""Shared by the export tests: tiny bases with the embedded tokenizer, random adapters, GGUF reading."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

import lorafit
from lorafit import cli
from lorafit.models import load_model


def save_base(model, tokenizer, folder: Path) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def make_adapter(base_dir: str, folder: Path, tokenizer=None, seed: int = 0, **config) -> Path:
    """A random, non-zero adapter (B = 0 at init would make it a no-op), saved with `tokenizer` (default:
    its base's) as training saves it."""
    from lorafit.models import load_tokenizer

    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    model = load_model(base_dir)
    lorafit.add_lora(model, lorafit.LoraConfig(**{**settings, **config}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    lorafit.save_adapter(model, folder, base_model_name_or_path=base_dir)
    (tokenizer or load_tokenizer(base_dir)).save_pretrained(folder)
    return folder


def export(*argv) -> int:
    return cli.main(["export", *map(str, argv)])


def metadata(reader: gguf.GGUFReader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def tensors(reader: gguf.GGUFReader) -> dict[str, tuple[list[int], gguf.GGMLQuantizationType, np.ndarray]]:
    """name -> (GGML ne, storage type, values dequantised to float32 in PyTorch's row-major layout)."""
    found = {}
    for tensor in reader.tensors:
        ne = [int(n) for n in tensor.shape]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(list(reversed(ne)))
        found[tensor.name] = (ne, tensor.tensor_type, values)
    return found


def undo_llama_cpp_rope_order(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' own inverse of llama.cpp's q/k row order (what it uses to load llama.cpp GGUFs):
    an independent reference for our writer."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    restored = LlamaTensorProcessor()._reverse_permute_weights(weight.numpy(), n_heads, n_heads)
    return torch.from_numpy(np.ascontiguousarray(restored))
