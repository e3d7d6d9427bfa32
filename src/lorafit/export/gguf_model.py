"""The merged model as one GGUF file: weights, hyper-parameters and tokenizer, for llama.cpp's graph.

Every parameter is renamed through gguf's tensor map (`architectures.TensorNames`); a parameter with
no llama.cpp counterpart is an error, never dropped. Llama's q/k rows are reordered for llama.cpp's
RoPE (`architectures`). A tied output head is not written: llama.cpp reuses `token_embd` when
`output.weight` is absent. The hyper-parameters are the `{arch}.*` keys llama.cpp reads (layer, head
and key/value-head counts, sizes, context length, RMSNorm epsilon, RoPE base and scaling); Llama 3's
RoPE scaling has no key but a `rope_freqs` tensor of per-frequency divisors, computed here.
"""

from __future__ import annotations

import logging
import math

import gguf
import numpy as np
import torch

from lorafit.export.architectures import TensorNames, UnsupportedArchitecture, architecture_of, to_llama_cpp_rows
from lorafit.export.gguf_file import PlannedFile
from lorafit.export.gguf_tokenizer import describe_tokenizer

logger = logging.getLogger(__name__)


def rope_parameters(config) -> dict:
    """RoPE settings whichever way the config spells them (transformers 5's rope_parameters, or older)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    return rope


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_divisors(config) -> np.ndarray:
    """Llama 3.1's RoPE scaling as llama.cpp applies it: each frequency is divided by its factor.

    Wavelengths shorter than original_context / high_freq_factor keep their frequency, those longer
    than original_context / low_freq_factor are slowed by `factor`, and those between are blended.
    """
    rope = rope_parameters(config)
    dim = head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    frequencies = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    divisors = []
    for frequency in frequencies:
        wavelength = 2 * math.pi / frequency
        if wavelength < context / high:
            divisors.append(1.0)
        elif wavelength > context / low:
            divisors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def check_supported(config) -> None:
    """Errors for a config llama.cpp would run differently from transformers (before any work)."""
    architecture = architecture_of(config)
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise UnsupportedArchitecture(f"RoPE scaling {rope_type!r} is not exported (default, linear, llama3 and yarn are)")
    if architecture.gguf_arch == gguf.MODEL_ARCH.LLAMA and (getattr(config, "mlp_bias", False)):
        raise UnsupportedArchitecture("mlp_bias=True: llama.cpp's Llama graph has no feed-forward biases")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True)
    if window and uses_window and window < config.max_position_embeddings:
        logger.warning("sliding_window=%s: llama.cpp's %s graph attends to the whole context, so answers past %s "
                       "tokens can differ from transformers'", window, architecture.gguf_name, window)


def describe_hyperparameters(writer: gguf.GGUFWriter, config, file_type: gguf.LlamaFileType) -> None:
    heads = config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings", config.max_position_embeddings))
    writer.add_file_type(file_type)


def plan_model(model, tokenizer, end_of_turn_id: int | None, wanted: gguf.GGMLQuantizationType,
               file_type: gguf.LlamaFileType, name: str) -> PlannedFile:
    """The GGUF file for a plain (merged) transformers model and its tokenizer."""
    config = model.config
    check_supported(config)
    architecture = architecture_of(config)
    names = TensorNames(architecture, config)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def describe(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        describe_hyperparameters(writer, config, file_type)
        describe_tokenizer(writer, tokenizer, config.vocab_size, end_of_turn_id)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    arch = architecture.gguf_name
    plan = PlannedFile(arch, describe, expected_metadata={
        gguf.Keys.General.ARCHITECTURE: arch,
        gguf.Keys.General.TYPE: gguf.GGUFType.MODEL,
        gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch): config.num_hidden_layers,
        gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch): None,
        gguf.Keys.Tokenizer.MODEL: "gpt2",
        gguf.Keys.Tokenizer.PRE: None,
        gguf.Keys.Tokenizer.LIST: None,
        gguf.Keys.Tokenizer.MERGES: None,
        gguf.Keys.Tokenizer.EOS_ID: None,
    })
    if tokenizer.chat_template:
        plan.expected_metadata[gguf.Keys.Tokenizer.CHAT_TEMPLATE] = None
    output_head = model.get_output_embeddings()
    with torch.no_grad():
        for hf_name, tensor in model.state_dict().items():
            kind, gguf_name = names.require(hf_name)
            if kind == gguf.MODEL_TENSOR.OUTPUT and tied and output_head is not None:
                continue  # llama.cpp reads token_embd when output.weight is absent
            values = to_llama_cpp_rows(kind, tensor.detach().float().cpu(), architecture, config)
            plan.add(gguf_name, values.numpy(), wanted)
    if rope_parameters(config)["rope_type"] == "llama3":
        plan.add(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_divisors(config),
                 gguf.GGMLQuantizationType.F32)
    return plan
