"""Training attention without wasted squares: per example for packed rows, unmasked for right padding.

Two batch layouts make the stock `sdpa` path pay for scores nobody uses:

* **packed rows** (`--packing`): one row of several examples, `position_ids` restarting at each.
  transformers makes that correct with a block-diagonal `[row x row]` mask, but SDPA still works
  through the whole square: 8 examples of 200 tokens cost 1,600^2 scores where 8 x 200^2, eight
  times fewer, are needed, and the masked kernel is slower per score as well. Here q, k and v are
  cut at the restarts of `position_ids` and each example runs causal SDPA with no mask.
  (flash-attention's varlen kernel does the same on GPUs; it does not run on a CPU.)
* **right-padded batches** (dynamic padding): under a causal mask a real token never sees the
  padding after it, so the padding mask changes nothing that is trained (padded positions have
  label -100), yet passing it forces SDPA off its memory-efficient kernel onto one that keeps
  `[batch x heads x seq x seq]` weights per layer. Such batches run plain causal SDPA.

A model using this attention may also take a right-padded batch apart into one packed row before
its forward pass (`unpad_to_packed_row`, used by `lorafit.train.trained_token_loss`): the same
numbers, no work for padding at all.

`training_sdpa_forward` is registered with transformers' `AttentionInterface` as ``lorafit_sdpa``
(with a mask builder that knows the second case); anything else (left padding, a KV cache, sliding
windows, a model that does not pass `position_ids` to its attention) gets the stock `sdpa`
function with the mask transformers built, so the switch is never less correct than sdpa.
tests/train/test_attention.py checks losses and gradients against stock sdpa and against examples
run one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

NAME = "lorafit_sdpa"

_cache: tuple | None = None  # (position_ids, its version, bounds): one row's bounds, shared by every layer


def segment_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the examples of one packed row: a new one wherever positions do not step by 1."""
    global _cache
    if _cache is not None and _cache[0] is position_ids and _cache[1] == position_ids._version:
        return _cache[2]
    positions = position_ids.reshape(-1)
    starts = [0] + (torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1).tolist()
    bounds = list(zip(starts, starts[1:] + [positions.numel()]))
    _cache = (position_ids, position_ids._version, bounds)
    return bounds


def training_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          position_ids=None, **kwargs):
    """Attention per packed example (q, k, v: [1, heads, row, dim]); the stock sdpa otherwise."""
    packed = (position_ids is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1
              and position_ids.shape[-1] == query.shape[2] and kwargs.get("softcap") is None)
    bounds = segment_bounds(position_ids) if packed else []
    if len(bounds) < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    grouped_query = query.shape[1] != key.shape[1]
    outputs = [
        F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                       dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=grouped_query)
        for start, end in bounds
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # [1, row, heads, dim], as sdpa returns


def unpad_to_packed_row(input_ids: torch.Tensor, attention_mask: torch.Tensor, shift_labels: torch.Tensor):
    """A right-padded batch as one packed row: (ids [1, n], position_ids [1, n], shift_labels [1, n]).

    The same computation for every real token (each row becomes an example of the row, attending
    to itself only, at the positions it had), with no work at all for padding. Labels must be
    shifted before (within each row), so no example learns to predict the next one's first token.
    None when the batch is not right-padded or has no padding to remove.
    """
    if attention_mask.dim() != 2 or bool(attention_mask.all()) or not is_right_padded(attention_mask):
        return None
    real = attention_mask.bool()
    positions = torch.cumsum(real, dim=1) - 1
    return input_ids[real][None], positions[real][None], shift_labels[real][None]


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (and starts with a one)."""
    mask = attention_mask.bool()
    return bool(mask[:, 0].all() and (mask[:, 1:] <= mask[:, :-1]).all())


def training_sdpa_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                       attention_mask=None, **kwargs):
    """No mask (causal SDPA) for a plain causal mask over right-padded rows; sdpa's mask otherwise."""
    if (mask_function is causal_mask_function and attention_mask is not None and attention_mask.dim() == 2
            and q_length == kv_length == attention_mask.shape[-1] and not q_offset and not kv_offset
            and is_right_padded(attention_mask)):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, training_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, training_sdpa_mask)


def sliding_window_in_use(config) -> bool:
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False


def use_training_attention(model) -> bool:
    """Switch a model on stock sdpa to `lorafit_sdpa` for training; False when it stays as it is.

    Models with a sliding window or attention soft-capping keep theirs, and so do explicit other
    choices (flash-attention's varlen kernel already handles packed rows on GPUs). Switch back with
    `model.set_attn_implementation("sdpa")` before generating with a KV cache.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if sliding_window_in_use(config) or getattr(config, "attn_logit_softcapping", None):
        return False
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return False
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME
