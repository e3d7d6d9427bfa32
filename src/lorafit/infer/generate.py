"""KV-cached autoregressive generation for a batch of prompts.

Without a cache, producing token t+1 re-runs the model over all t tokens before it: n new tokens
cost O(n^2) token-passes. Attention only ever needs the keys and values of earlier positions,
which do not change, so we keep them (the KV cache) and feed the model one new token per step:
O(n) token-passes (see `bench/bench_generate.py` for what that buys).

Batches are left-padded: every row's last prompt token sits in the last column, so one step
appends one column for all rows. Padding is hidden by the attention mask, and `position_ids`
count only real tokens, so a padded row sees exactly what it would see alone.

A row ends at a stop token (end of turn / EOS: `lorafit.data.templates.end_of_turn_token_ids`), at
a stop string, or after `max_new_tokens`; the batch ends when every row has.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from lorafit.errors import UserError
from lorafit.infer.detokenize import IncrementalDecoder
from lorafit.infer.options import GenerationOptions
from lorafit.infer.sampling import choose_next_tokens, make_generator

# on_text(row, new_text) -> False to stop that row early (e.g. the client went away).
TextCallback = Callable[[int, str], "bool | None"]


@dataclass
class Completion:
    text: str  # the answer, without stop tokens and cut before any stop string
    token_ids: list[int] = field(default_factory=list)  # generated ids, stop token excluded
    finish_reason: str = "length"  # "stop" (stop token or string), "length" (max_new_tokens), "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens the model produced, stop token included (what was paid for)


class PromptTooLongError(UserError):
    """The prompt leaves no room for an answer within the model's context length."""


def context_length(model) -> int | None:
    """The most positions the model was built for (None when its config does not say)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    options: GenerationOptions,
    *,
    stop_token_ids: list[int] | tuple[int, ...] = (),
    pad_token_id: int | None = None,
    tokenizer=None,
    on_text: TextCallback | None = None,
) -> list[Completion]:
    """Generate an answer for each prompt (a list of token ids), all in one left-padded batch.

    `tokenizer` is needed for text (the answers, streaming with `on_text`, stop strings); without
    it only `token_ids` are filled in. Use `temperature=0` for greedy decoding.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    if options.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    max_new_tokens = _room_for_answer(model, prompts, options.max_new_tokens)
    device = model.device
    stop_ids = set(stop_token_ids)
    pad_token_id = pad_token_id if pad_token_id is not None else (stop_token_ids[0] if stop_token_ids else 0)

    input_ids, attention_mask = _left_pad(prompts, pad_token_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batch = len(prompts)
    seen = _seen_tokens(prompts, model, device) if options.repetition_penalty != 1.0 else None
    generator = None if options.greedy else make_generator(options.seed, device)
    decoders = [IncrementalDecoder(tokenizer, options.stop) for _ in prompts] if tokenizer is not None else None
    completions = [Completion(text="", prompt_tokens=len(p)) for p in prompts]
    running = [True] * batch
    running_mask = None  # a device copy of `running`, once some row has finished

    cache = _new_cache(model)
    logits = _forward(model, input_ids, attention_mask, position_ids, cache)
    for step in range(max_new_tokens):
        next_tokens = choose_next_tokens(logits, options, seen=seen, generator=generator)
        if running_mask is not None:  # finished rows are fed padding; their output is ignored
            next_tokens = torch.where(running_mask, next_tokens, pad_token_id)
        if seen is not None:
            seen[torch.arange(batch, device=device), next_tokens] = True
        finished_now = False
        for row, token in enumerate(next_tokens.tolist()):  # the one host sync per step
            if running[row] and not _record_token(completions[row], decoders, row, token, token in stop_ids, on_text):
                running[row], finished_now = False, True
        if not any(running) or step == max_new_tokens - 1:
            break
        if finished_now:
            running_mask = torch.tensor(running, device=device)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        logits = _forward(model, next_tokens[:, None], attention_mask, position_ids, cache)

    for row, completion in enumerate(completions):
        if decoders is not None:
            tail = decoders[row].finish()
            if tail and on_text is not None:
                on_text(row, tail)
            completion.text = decoders[row].answer
            if decoders[row].stopped and completion.finish_reason == "length":
                completion.finish_reason = "stop"  # the stop string showed up in the last characters
    return completions


def _record_token(completion: Completion, decoders, row: int, token: int, is_stop_token: bool, on_text) -> bool:
    """Account for one new token of a row; return whether the row keeps going."""
    completion.completion_tokens += 1
    if is_stop_token:
        completion.finish_reason = "stop"
        return False
    completion.token_ids.append(token)
    if decoders is None:
        return True
    decoder = decoders[row]
    new_text = decoder.add(token)
    if new_text and on_text is not None and on_text(row, new_text) is False:
        completion.finish_reason = "cancelled"
        return False
    if decoder.stopped:  # a stop string appeared
        completion.finish_reason = "stop"
        return False
    return True


def _room_for_answer(model, prompts: list[list[int]], max_new_tokens: int) -> int:
    limit = context_length(model)
    longest = max(len(p) for p in prompts)
    if limit is None:
        return max_new_tokens
    if longest >= limit:
        raise PromptTooLongError(
            f"the prompt has {longest} tokens but the model's context length is {limit}: shorten it"
        )
    return min(max_new_tokens, limit - longest)


def _left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _seen_tokens(prompts: list[list[int]], model, device) -> torch.Tensor:
    """A [batch, vocab] mask of the tokens in each prompt (for the repetition penalty)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    seen = torch.zeros((len(prompts), vocab), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        seen[row, torch.tensor(prompt, dtype=torch.long, device=device)] = True
    return seen


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _forward(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """One model call; returns the logits of the last position [batch, vocab]."""
    kwargs = {"attention_mask": attention_mask, "position_ids": position_ids,
              "past_key_values": cache, "use_cache": True}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1  # the prompt's other positions need no vocabulary projection
    return model(input_ids, **kwargs).logits[:, -1, :]


def _accepts_logits_to_keep(model) -> bool:
    return _forward_takes_logits_to_keep(type(model))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(model_class) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
