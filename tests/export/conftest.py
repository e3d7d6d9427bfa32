"""Tiny Llama, Qwen2 and Mistral bases with a tiny byte-level BPE tokenizer, for the merged-GGUF tests.

The embedded tokenizer's 49,152 tokens and merges make every GGUF read (gguf's reader, transformers'
loader) take seconds; a 400-token tokenizer trained here in a blink keeps those tests fast. It speaks
ChatML with SmolLM2's chat template. llama.cpp names pre-tokenizers by the hash of the ids of a probe
text, which no real model shares with this tokenizer, so its hash is registered as GPT-2's (the
pre-tokenizer it has: plain byte-level BPE) for the duration of each test.
"""

from __future__ import annotations

import pytest

from export_helpers import save_base
from model_builders import build_tiny_llama, build_tiny_qwen2

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is.",
    "Count from 1 to 5: 1 2 3 4 5. Then say 42! Be brief, be helpful, be kind.",
    "user assistant system You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "Écris une phrase en français avec des émojis 🚀, des espaces\tet des\nretours à la ligne.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer(smol_tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(TRAINING_TEXT, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = smol_tokenizer.chat_template
    return tokenizer


@pytest.fixture(autouse=True)
def tiny_tokenizer_is_known_to_llama_cpp(request, monkeypatch):
    if "tiny_tokenizer" not in request.fixturenames:
        return
    from lorafit.export import gguf_tokenizer

    digest = gguf_tokenizer.probe_hash(request.getfixturevalue("tiny_tokenizer"))
    monkeypatch.setitem(gguf_tokenizer.KNOWN_PRE_TOKENIZERS, digest, "gpt-2")


def _sizes(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory, tiny_tokenizer) -> dict[str, str]:
    """Folders of a Llama (untied head), a Qwen2 (tied embeddings, q/k/v biases) and a Mistral."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, sliding_window=None, tie_word_embeddings=False, **_sizes(tiny_tokenizer))).eval()
    models = {"llama": build_tiny_llama(**_sizes(tiny_tokenizer)), "qwen2": build_tiny_qwen2(**_sizes(tiny_tokenizer)),
              "mistral": mistral}
    return {arch: save_base(model, tiny_tokenizer, tmp_path_factory.mktemp(f"tiny-{arch}"))
            for arch, model in models.items()}
