"""Cached generation against the references: transformers' `generate` and its logits processors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lorafit.infer.generate import PromptTooLongError, generate
from lorafit.infer.options import GenerationOptions, GenerationOptionsError
from lorafit.infer.sampling import apply_repetition_penalty, apply_top_k, apply_top_p, choose_next_tokens

from model_builders import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2

GREEDY = GenerationOptions(temperature=0, max_new_tokens=12)
PROMPTS = [[5, 17, 42, 9, 3, 77, 21], [8, 1, 60], [100, 2, 33, 4, 90]]


def reference_greedy(model, prompts, max_new_tokens, pad_token_id=0, **kwargs):
    """transformers' own greedy generation on the same left-padded batch (no stop tokens)."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=None, **kwargs,
    )
    return out[:, width:].tolist()


@pytest.mark.parametrize("build", [build_tiny_llama, build_tiny_qwen2, build_tiny_gpt2])
def test_greedy_batch_matches_transformers_generate(build):
    model = build()
    ours = generate(model, PROMPTS, GREEDY, pad_token_id=0)
    assert [c.token_ids for c in ours] == reference_greedy(model, PROMPTS, 12)
    assert all(c.finish_reason == "length" and c.completion_tokens == 12 for c in ours)


def test_left_padded_rows_equal_their_unbatched_selves(tiny_llama):
    batched = generate(tiny_llama, PROMPTS, GREEDY, pad_token_id=0)
    alone = [generate(tiny_llama, [p], GREEDY, pad_token_id=0)[0] for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]


def test_repetition_penalty_greedy_matches_transformers(tiny_llama):
    options = GenerationOptions(temperature=0, max_new_tokens=10, repetition_penalty=1.7)
    ours = generate(tiny_llama, PROMPTS[:1], options, pad_token_id=0)
    assert ours[0].token_ids == reference_greedy(tiny_llama, PROMPTS[:1], 10, repetition_penalty=1.7)[0]


def test_stop_token_ends_only_its_row(tiny_llama):
    free = generate(tiny_llama, PROMPTS, GREEDY, pad_token_id=0)
    stop = free[0].token_ids[3]
    first_hit = [c.token_ids.index(stop) if stop in c.token_ids else None for c in free]
    stopped = generate(tiny_llama, PROMPTS, GREEDY, stop_token_ids=[stop], pad_token_id=0)
    for before, after, hit in zip(free, stopped, first_hit):
        if hit is None:
            assert after.token_ids == before.token_ids and after.finish_reason == "length"
        else:
            assert after.token_ids == before.token_ids[:hit]  # the stop token itself is not part of the answer
            assert after.finish_reason == "stop" and after.completion_tokens == hit + 1


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_llama):
    options = GenerationOptions(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=16, seed=123)
    first = generate(tiny_llama, PROMPTS, options, pad_token_id=0)
    again = generate(tiny_llama, PROMPTS, options, pad_token_id=0)
    other = generate(tiny_llama, PROMPTS, options.updated(seed=7), pad_token_id=0)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_prompt_longer_than_context_is_a_user_error():
    model = build_tiny_llama(max_position_embeddings=16)
    with pytest.raises(PromptTooLongError, match="context length is 16"):
        generate(model, [list(range(1, 17))], GREEDY)
    # Near the limit the answer is cut to what still fits.
    (completion,) = generate(model, [list(range(1, 13))], GREEDY)
    assert completion.completion_tokens == 4


# --- each sampling step against transformers' logits processors -------------------------------

def random_logits(seed=0, batch=4, vocab=97):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=generator) * 3


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_matches_transformers(top_k):
    logits = random_logits(top_k)
    assert torch.equal(apply_top_k(logits, top_k), TopKLogitsWarper(top_k)(None, logits))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(top_p):
    logits = random_logits(int(top_p * 100))
    assert torch.equal(apply_top_p(logits, top_p), TopPLogitsWarper(top_p)(None, logits))


def test_repetition_penalty_matches_transformers():
    logits = random_logits(3, batch=2)
    history = torch.tensor([[1, 5, 5, 9, 40], [2, 3, 4, 60, 96]])
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_sampling_distribution_is_the_filtered_softmax():
    """Draws follow temperature -> top-k -> top-p applied as transformers applies them."""
    logits = random_logits(11, batch=1, vocab=12)
    options = GenerationOptions(temperature=0.8, top_k=6, top_p=0.9)
    expected = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(6)(None, TemperatureLogitsWarper(0.8)(None, logits)))
    expected = expected.softmax(-1)[0]
    generator = torch.Generator().manual_seed(0)
    draws = choose_next_tokens(logits.expand(20000, -1), options, generator=generator)
    frequencies = torch.bincount(draws, minlength=12).float() / draws.numel()
    assert torch.all(frequencies[expected == 0] == 0)
    assert torch.allclose(frequencies, expected, atol=0.015)


def test_temperature_zero_is_greedy():
    logits = random_logits(5)
    options = GenerationOptions(temperature=0, top_k=3, top_p=0.5)
    assert torch.equal(choose_next_tokens(logits, options), logits.argmax(-1))


@pytest.mark.parametrize("change, flag", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"stop": [""]}, "stop"),
])
def test_out_of_range_options_name_the_flag(change, flag):
    with pytest.raises(GenerationOptionsError, match=f"--{flag}"):
        GenerationOptions().updated(**change)
