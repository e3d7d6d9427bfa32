"""Shared fixtures: tiny random models built here (no downloads) and the embedded tokenizer.

Tiny Llama, Qwen2 and GPT-2 models with a 128-token vocabulary serve the LoRA-core tests.
`tiny_model_dir` is a tiny Llama that shares the embedded SmolLM2 tokenizer and chat template, saved
as a normal model folder, so data, training and inference tests run the real CLI in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Reuse one converted embedded model across local runs; a fresh CI clone converts it once.
os.environ.setdefault("LORAFIT_HOME", str(REPO / ".cache" / "lorafit-test"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = REPO.parent / "shared" / "data"


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


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture
def tiny_qwen2():
    return build_tiny_qwen2()


@pytest.fixture
def tiny_gpt2():
    return build_tiny_gpt2()


@pytest.fixture(scope="session")
def embedded_model_path() -> str:
    """The embedded SmolLM2 model converted to a Hugging Face folder (converted once per cache)."""
    from lorafit.models import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="session")
def smol_tokenizer(embedded_model_path):
    from lorafit.models import load_tokenizer

    return load_tokenizer(embedded_model_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny random Llama with the embedded tokenizer and chat template, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-smol-llama")
    model = build_tiny_llama(
        vocab_size=len(smol_tokenizer),
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def alpaca_demo_path() -> Path:
    path = SHARED_DATA / "alpaca_en_demo.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path
