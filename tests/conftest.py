"""Shared fixtures: tiny random models built here (no downloads) and the embedded tokenizer.

Tiny Llama, Qwen2 and GPT-2 models with a 128-token vocabulary (builders in `model_builders.py`)
serve the LoRA-core tests. `tiny_model_dir` is a tiny Llama that shares the embedded SmolLM2
tokenizer and chat template, saved as a normal model folder, so data, training and inference
tests run the real CLI in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model_builders import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2

REPO = Path(__file__).resolve().parents[1]
# Reuse one converted embedded model across local runs; a fresh CI clone converts it once.
os.environ.setdefault("LORAFIT_HOME", str(REPO / ".cache" / "lorafit-test"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = REPO.parent / "shared" / "data"


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


def _save_tiny_smol_llama(tmp_path_factory, tokenizer, name: str, **sizes) -> str:
    folder = tmp_path_factory.mktemp(name)
    model = build_tiny_llama(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny random Llama with the embedded tokenizer and chat template, saved as a model folder."""
    return _save_tiny_smol_llama(tmp_path_factory, smol_tokenizer, "tiny-smol-llama")


@pytest.fixture(scope="session")
def wide_tiny_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    """The same, 64 wide: bitsandbytes' 4-bit inference kernel for CPUs with AVX512-BF16 needs
    in_features of at least its block size (64). QLoRA tests that load it quantized use this one."""
    return _save_tiny_smol_llama(tmp_path_factory, smol_tokenizer, "wide-tiny-smol-llama",
                                 hidden_size=64, intermediate_size=128)


@pytest.fixture
def alpaca_demo_path() -> Path:
    path = SHARED_DATA / "alpaca_en_demo.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path
