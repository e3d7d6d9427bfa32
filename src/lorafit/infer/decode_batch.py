"""The tensors of a running batch: one KV cache for all rows, left-padded and right-aligned.

Without a cache, producing token t+1 re-runs the model over all t tokens before it: n new tokens
cost O(n^2) token-passes. Attention only ever needs the keys and values of earlier positions,
which do not change, so we keep them (the KV cache) and feed the model one new token per step:
O(n) token-passes (see `bench/bench_generate.py` for what that buys).

Rows are left-padded: every row's newest token sits in the last column, so one step appends one
column for all rows. Padding is hidden by the attention mask, and each row's position ids count
only its real tokens, so a padded row sees exactly what it would see alone.

Rows join and leave between steps (continuous batching, `lorafit.infer.engine`):
- `prefill` runs a group of new prompts through the model in one left-padded call;
- `join` appends one batch's rows to another's: the one with fewer columns is padded on the left
  (zero keys and values, mask 0), so the newest columns of both still line up;
- `keep_rows` drops the rows that finished, then the leading columns no remaining row uses.
Splicing touches the cache's per-layer key/value tensors, which only plain `DynamicLayer`s keep
whole; for other caches (sliding windows, ...) `can_join` is False: the engine admits new rows only
into an empty batch, and rows leave without their columns being cut.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch


@dataclass
class DecodeBatch:
    cache: object  # a transformers DynamicCache holding every row's keys and values
    attention_mask: torch.Tensor  # [rows, columns] long: 1 for real tokens, 0 for padding
    next_positions: torch.Tensor  # [rows] long: the position id of each row's next token

    @property
    def rows(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def can_join(self) -> bool:
        """Whether rows can be spliced in and out (every cache layer a whole, plain DynamicLayer)."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    @classmethod
    def prefill(cls, model, prompts: list[list[int]], pad_token_id: int) -> tuple["DecodeBatch", torch.Tensor]:
        """Run the prompts through the model in one left-padded call; returns the batch and the
        logits of each prompt's last position [rows, vocab]."""
        input_ids, attention_mask = left_pad(prompts, pad_token_id, model.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache(model)
        logits = forward(model, input_ids, attention_mask, position_ids, cache)
        return cls(cache, attention_mask, position_ids[:, -1] + 1), logits

    def step(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [rows]; returns the next logits [rows, vocab]."""
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(self.rows, 1)], dim=-1)
        logits = forward(model, tokens[:, None], self.attention_mask, self.next_positions[:, None], self.cache)
        self.next_positions = self.next_positions + 1
        return logits

    def join(self, other: "DecodeBatch") -> None:
        """Append the rows of `other` (both must `can_join`) after this batch's rows."""
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_columns(mine.keys, width, -2), _pad_columns(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_columns(mine.values, width, -2), _pad_columns(theirs.values, width, -2)])
        self.attention_mask = torch.cat([_pad_columns(self.attention_mask, width, -1),
                                         _pad_columns(other.attention_mask, width, -1)])
        self.next_positions = torch.cat([self.next_positions, other.next_positions])

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then drop the columns that are padding in all of them."""
        index = torch.tensor(rows, dtype=torch.long, device=self.attention_mask.device)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.next_positions = self.next_positions.index_select(0, index)
        if not self.can_join:  # columns we cannot cut (e.g. a sliding window): select rows the cache's way
            self.cache.batch_select_indices(index)
            return
        first_used = int(self.attention_mask.any(dim=0).int().argmax())
        self.attention_mask = self.attention_mask[:, first_used:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., first_used:, :]
            layer.values = layer.values.index_select(0, index)[..., first_used:, :]


def _pad_columns(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Left-pad `tensor` with zeros along `dim` to `width` columns."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def forward(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """One model call; returns the logits of the last position [batch, vocab]."""
    takes = _forward_parameters(type(model))
    kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": True,
              # transformers 5.x renames `past_key_values` to `cache` (the old name warns, then goes)
              ("cache" if "cache" in takes else "past_key_values"): cache}
    if "logits_to_keep" in takes:
        kwargs["logits_to_keep"] = 1  # the prompt's other positions need no vocabulary projection
    return model(input_ids, **kwargs).logits[:, -1, :]


@functools.lru_cache(maxsize=None)
def _forward_parameters(model_class) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)
