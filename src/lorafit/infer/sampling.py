"""Choosing the next token from the model's last logits.

The order and the meaning of each step follow transformers' logits processors, so a setting means
the same thing here as in `model.generate` (tests check each step against them):

1. repetition penalty (CTRL, Keskar et al. 2019): a token already in the text has its logit divided
   by the penalty when positive, multiplied when negative, so it becomes less likely either way;
2. greedy (temperature 0): the argmax, and nothing else matters;
3. temperature: logits / T;
4. top-k: keep the k largest logits;
5. top-p (nucleus, Holtzman et al. 2019): keep the smallest set of most likely tokens whose
   probabilities add up to at least p (always at least one);
6. draw from the softmax of what is left, with a seeded `torch.Generator`.
"""

from __future__ import annotations

import torch

from lorafit.infer.options import GenerationOptions


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """`logits` [batch, vocab]; `seen` a bool mask of the same shape marking tokens already in the text."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Ascending order: the tokens whose cumulative mass stays within the 1 - p tail go; the most
    # likely token (last) always stays.
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def choose_next_tokens(
    logits: torch.Tensor,
    options: GenerationOptions,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row: `logits` [batch, vocab] -> token ids [batch]."""
    logits = logits.float()  # sampling in fp32: bf16 softmax tails are too coarse for top-p
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
    if options.greedy:
        return logits.argmax(dim=-1)
    logits = logits / options.temperature
    logits = apply_top_k(logits, options.top_k)
    logits = apply_top_p(logits, options.top_p)
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)


def choose_next_tokens_per_row(
    logits: torch.Tensor,
    options: list[GenerationOptions],
    seen: list[torch.Tensor | None],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """The next token of each row, each with its own settings and generator: `logits` [rows, vocab]
    -> token ids [rows]. A row's draw never depends on its neighbours, so a seeded request samples
    the same tokens whatever batch it runs in. `seen[row]` is that row's [1, vocab] mask or None."""
    chosen = logits.argmax(dim=-1)  # what greedy rows without a penalty take; the rest are redone
    for row, (row_options, row_seen, generator) in enumerate(zip(options, seen, generators)):
        if row_options.greedy and row_seen is None:
            continue
        chosen[row] = choose_next_tokens(logits[row:row + 1], row_options, seen=row_seen, generator=generator)[0]
    return chosen


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
