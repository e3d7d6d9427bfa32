"""Tiny random Llama, Qwen2 and GPT-2 models (128-token vocabulary by default), built offline.

They live in their own module so tests can import the builders by a unique name; `conftest.py`
turns them into fixtures.
"""

from __future__ import annotations

import torch


def build_tiny_llama(vocab_size: int = 128, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    config = LlamaConfig(vocab_size=vocab_size, **{**sizes, **overrides})
    return LlamaForCausalLM(config).eval()


def build_tiny_qwen2(vocab_size: int = 128, seed: int = 0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    config = Qwen2Config(vocab_size=vocab_size, **{**sizes, **overrides})
    return Qwen2ForCausalLM(config).eval()


def build_tiny_gpt2(vocab_size: int = 128, seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    sizes = dict(n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)
    config = GPT2Config(vocab_size=vocab_size, **{**sizes, **overrides})
    return GPT2LMHeadModel(config).eval()
