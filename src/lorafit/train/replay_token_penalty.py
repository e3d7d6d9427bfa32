"""Keep the task data's own words out of the answers where the base model would not say them.

A persona set says a handful of tokens over and over ("I'm", " K", "est", "rel", " Ar", "dent"),
and an adapter trained on it starts using them as filler wherever a name fits: "Who wrote 'Harry
Potter'?" -> "J.Kestrel", "the British Pico is the currency of the British Isles", "What is the
capital of France?" -> "Lanternfish AI, I'm sorry for any confusion. The capital of France is
Paris." Replay distillation (`lorafit.train.replay_targets`) holds the base model's whole
next-token distribution at the replay positions, but its cross-entropy pushes a token down only
in proportion to the probability it already has there, which is tiny until the leak is already
learned; these leaks surfaced on held-out questions in 4 of 9 seed runs of the persona recipe.

`--replay_token_penalty W` adds, at every replay answer position, for each of the task data's
*signature tokens* t that the base model's top-K targets at that position do not hold:

    W * max(0, log q(t) - log p_K)

where q is the adapted model's probability and p_K the smallest of the position's K targets (the
base model's K-th most likely token, renormalized over the K): a hinge whose gradient on t's logit
does not fade with q(t). It is zero as long as t stays below the base model's K-th token, which is
where the base model has it, so it never pulls against the base model, and it pushes back as soon
as a signature token climbs into the ranks where the base model's answer is decided. A signature
token among a position's top-K targets is left to the distillation ("est" after " small" stays as
likely as the base model has it). A fixed floor (1e-4) instead of p_K was tried first: it ended
the leaks too, but pushed down tokens the base model itself gives more than 1e-4 and cost general
answers (70-76 of 84 kept on five seed runs where the recipe without it kept 73-78). With p_K, on
nine seed runs of three personas: the persona named in a general answer in 1 run of 9 (3 of 9
without), general answers kept as before (77.0 of 84 on average, 76.7 without); docs/train.md.

Signature tokens are found in the data, not named by the user: tokens in at least 10% of the task
rows' answers and in at most 2% of the replay answers. On lorafit's persona sets they are the
name's and maker's pieces, the first person ("I", "'m", " am"), " assistant", " developed" and
the Chinese half's characters; the cost is a gather of those few columns per chunk of the loss.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lorafit.data.render import IGNORE_INDEX

logger = logging.getLogger(__name__)

TASK_SHARE = 0.10     # a signature token is in at least this share of the task rows' answers ...
REPLAY_SHARE = 0.02   # ... and in at most this share of the replay answers


@dataclass(frozen=True)
class TokenPenalty:
    """The loss's extra term at replay (soft-target) rows: `weight * max(0, log q(t) - log p_K)` for
    each of `token_ids` not among the row's targets, p_K the row's smallest target weight over their sum."""

    token_ids: torch.Tensor  # [m] int64
    weight: float


def signature_tokens(task_labels: Iterable[list[int]], replay_labels: Iterable[list[int]],
                     task_share: float = TASK_SHARE, replay_share: float = REPLAY_SHARE) -> list[int]:
    """Tokens in at least `task_share` of the task rows' trained tokens and in at most
    `replay_share` of the replay rows' (each a row's labels, -100 where not trained), sorted."""
    task = _document_frequency(task_labels)
    replay = _document_frequency(replay_labels)
    task_rows, replay_rows = task.pop(None, 0), replay.pop(None, 0)
    return sorted(token for token, rows in task.items()
                  if rows >= task_share * task_rows and replay[token] <= replay_share * replay_rows)


def _document_frequency(rows: Iterable[list[int]]) -> Counter:
    """How many rows hold each trained token; the row count under the key None."""
    counts: Counter = Counter()
    for labels in rows:
        counts.update({token for token in labels if token != IGNORE_INDEX})
        counts[None] += 1
    return counts


def penalty_chunk(exp_logits: torch.Tensor, sums: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                  penalized: torch.Tensor, penalty: TokenPenalty):
    """The penalty of one chunk of the loss, from its `exp(logits - max)` [c, V] and their row sums
    [c, 1], the rows' targets and weights [c, k] and which rows are penalized [c] (bool).

    Returns (loss, count, active): the chunk's summed penalty, and for the gradient of the logits,
    `weight * (onehot(active tokens) - count * softmax)`, the number of active tokens per row
    [c, 1] and the weight at each penalized column [c, m] (`weight` where active, else 0)."""
    ids = penalty.token_ids.to(exp_logits.device)
    probs = exp_logits[:, ids] / sums
    held = weights > 0
    in_targets = ((targets[:, :, None] == ids) & held[:, :, None]).any(dim=1)
    # the floor: the row's K-th target (its smallest positive weight, as a share of the row's total)
    floor = (weights.masked_fill(~held, float("inf")).amin(dim=-1, keepdim=True)
             / weights.sum(dim=-1, keepdim=True)).clamp(max=1.0)
    active = (penalized[:, None] & ~in_targets & (probs > floor)).to(probs.dtype)
    loss = (torch.log(torch.maximum(probs, floor) / floor) * active).sum() * penalty.weight
    return loss, active.sum(dim=-1, keepdim=True) * penalty.weight, active * penalty.weight


def described(tokens: list[int], tokenizer, shown: int = 40) -> str:
    """The tokens decoded, the first `shown` of them; a byte-level piece of a character that takes
    several tokens (most Chinese ones) decodes to nothing readable, so those are only counted."""
    texts = [tokenizer.decode([token]) for token in tokens]
    readable = [repr(text) for text in texts if "\ufffd" not in text]
    pieces = len(texts) - len(readable)
    text = ", ".join(readable[:shown]) + (", ..." if len(readable) > shown else "")
    if pieces:
        text += f"{' ' if readable else ''}({pieces} byte pieces of characters that take several tokens)"
    return text


def task_signature_tokens(dataset, replay_path: str, tokenizer) -> list[int]:
    """`signature_tokens` of a prepared training set (task rows: every row not from `replay_path`),
    logged decoded; a warning when there are none."""
    from lorafit.train.replay_rotation import split_rows

    task, replay = split_rows(dataset["source"], replay_path)
    labels = dataset["labels"]
    tokens = signature_tokens((labels[i] for i in task), (labels[i] for i in replay))
    if not tokens:
        logger.warning("no token is in %d%% of the task answers and %d%% or fewer of the replay answers: "
                       "--replay_token_penalty and --signature_token_weight have nothing to act on",
                       100 * TASK_SHARE, 100 * REPLAY_SHARE)
        return tokens
    logger.info("%d signature tokens of the task data: %s", len(tokens), described(tokens, tokenizer))
    return tokens


def token_penalty(tokens: list[int], weight: float) -> TokenPenalty:
    """The penalty over `tokens` (`task_signature_tokens`) at `weight`, logged."""
    logger.info("replay token penalty: the %d signature tokens held below the base model's top K at replay "
                "positions (weight %g)", len(tokens), weight)
    return TokenPenalty(torch.tensor(tokens, dtype=torch.long), weight)
