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
numbers, no work for padding at all. Tokens that begin every example of the batch and are not
trained (a chat template's system prompt: 25 of the ~60 tokens of a short persona record) are
computed once: the row keeps them only for its first example, and each later example's positions
start where the prefix ends. In a packed row, **an example whose positions start at s > 0 attends
to the row's first s tokens** (when the row's first example starts at 0 and is that long), then to
itself causally: the same keys and values it would have computed from the same tokens at the same
positions, so the same numbers (their gradients summed over the examples that read them).

`training_sdpa_forward` is registered with transformers' `AttentionInterface` as ``lorafit_sdpa``
(with a mask builder that knows the second case); anything else (left padding, a KV cache, sliding
windows, a model that does not pass `position_ids` to its attention) gets the stock `sdpa`
function with the mask transformers built, so the switch is never less correct than sdpa.
tests/train/test_attention.py checks losses and gradients against stock sdpa and against examples
run one by one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

NAME = "lorafit_sdpa"

MIN_SHARED_PREFIX = 4  # shorter common prefixes are not worth a separate key/value block
CPU_FLOAT32_ATTENTION_BELOW = 256  # bf16/fp16 segments shorter than this attend in float32 on a CPU (`_segment_sdpa`)
HALF_DTYPES = (torch.bfloat16, torch.float16)
_cache: tuple | None = None  # (position_ids, its version, bounds, prefixes): one row's, shared by every layer
packed_calls = 0  # attention calls that took a packed row apart: proof that a model's attention reads position_ids


def segment_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the examples of one packed row: a new one wherever positions do not step by 1."""
    return _row_layout(position_ids)[0]


def shared_prefixes(position_ids: torch.Tensor) -> list[int]:
    """For each example of the row, how many of the row's first tokens it reads as its prefix (0: none)."""
    return _row_layout(position_ids)[1]


def _row_layout(position_ids: torch.Tensor) -> tuple[list[tuple[int, int]], list[int]]:
    global _cache
    if _cache is not None and _cache[0] is position_ids and _cache[1] == position_ids._version:
        return _cache[2], _cache[3]
    positions = position_ids.reshape(-1)
    starts = [0] + (torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1).tolist()
    bounds = list(zip(starts, starts[1:] + [positions.numel()]))
    first = positions[starts].tolist()
    head = bounds[0][1] if first[0] == 0 else 0  # the row's first example, if it starts at position 0
    prefixes = [0] + [offset if 0 < offset <= head else 0 for offset in first[1:]]
    _cache = (position_ids, position_ids._version, bounds, prefixes)
    return bounds, prefixes


def _segment_sdpa(query, key, value, **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, in float32 for a short bf16/fp16 segment on a CPU.

    torch's CPU flash-attention kernel is several times slower in bf16 than in float32 on short
    sequences (forward + backward of one 40-token example: 1.8 ms against 0.4 ms on a 2-core Xeon
    with AMX; at 100 tokens 3.3 against 1.0), and packed rows of short chat examples are made of
    such calls. Upcasting q, k and v costs less than that and is, if anything, more exact. (Autocast,
    which `--bf16` turns on, would cast them back down: it is off for this call.)"""
    if query.device.type == "cpu" and key.shape[2] < CPU_FLOAT32_ATTENTION_BELOW:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
        if dtype in HALF_DTYPES:  # the dtype stock sdpa would compute and return in
            with torch.autocast("cpu", enabled=False):
                output = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), **kwargs)
            return output.to(dtype)
    return F.scaled_dot_product_attention(query, key, value, **kwargs)


def _prefixed_attention(query, key, value, prefix: int, start: int, end: int, dropout: float, scaling,
                        grouped_query: bool):
    """Causal attention of tokens [start, end) over the row's first `prefix` tokens and themselves."""
    length = end - start
    keys = torch.cat([key[:, :, :prefix], key[:, :, start:end]], dim=2)
    values = torch.cat([value[:, :, :prefix], value[:, :, start:end]], dim=2)
    mask = torch.ones(length, prefix + length, dtype=torch.bool, device=query.device)
    mask[:, prefix:] = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    return _segment_sdpa(query[:, :, start:end], keys, values, attn_mask=mask, dropout_p=dropout, scale=scaling,
                         enable_gqa=grouped_query)


def training_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          position_ids=None, **kwargs):
    """Attention per packed example (q, k, v: [1, heads, row, dim]); the stock sdpa otherwise."""
    packed = (position_ids is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1
              and position_ids.shape[-1] == query.shape[2] and kwargs.get("softcap") is None)
    bounds, prefixes = _row_layout(position_ids) if packed else ([], [])
    if len(bounds) < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    global packed_calls
    packed_calls += 1
    grouped_query = query.shape[1] != key.shape[1]
    outputs = [
        _prefixed_attention(query, key, value, prefix, start, end, dropout, scaling, grouped_query) if prefix else
        _segment_sdpa(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                      dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=grouped_query)
        for (start, end), prefix in zip(bounds, prefixes)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # [1, row, heads, dim], as sdpa returns


class PackedRow(NamedTuple):
    """A right-padded batch as one row: ids, positions and shifted labels [1, n], and how it was made:
    `real`, the [batch, seq] mask of the kept tokens (row-major), and the shared prefix's length."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    shift_labels: torch.Tensor
    real: torch.Tensor
    prefix: int


def unpad_to_packed_row(input_ids: torch.Tensor, attention_mask: torch.Tensor, shift_labels: torch.Tensor,
                        share_prefix: bool = False) -> PackedRow | None:
    """A right-padded batch as one packed row (`PackedRow`).

    The same computation for every real token (each row becomes an example of the row, attending
    to itself only, at the positions it had), with no work at all for padding. Labels must be
    shifted before (within each row), so no example learns to predict the next one's first token.
    With `share_prefix`, the untrained prefix all rows begin with is kept once (module docstring);
    only for a model whose attention is `training_sdpa_forward` and receives `position_ids`.
    None when the batch is not right-padded or has nothing to remove.
    """
    if attention_mask.dim() != 2 or not is_right_padded(attention_mask):
        return None
    real = attention_mask.bool()
    prefix = shared_untrained_prefix(input_ids, real, shift_labels) if share_prefix else 0
    if bool(real.all()) and not prefix:
        return None
    positions = torch.cumsum(real, dim=1) - 1
    if prefix:  # the later rows read the first row's copy of the common prefix
        real = real.clone()
        real[1:, :prefix] = False
    return PackedRow(input_ids[real][None], positions[real][None], shift_labels[real][None], real, prefix)


def share_packed_prefix(input_ids: torch.Tensor, position_ids: torch.Tensor, shift_labels: torch.Tensor):
    """A packed row ([1, n], positions restarting at 0 for every example) with the untrained prefix
    all its examples begin with kept once, for the first example; (ids, position_ids, shift_labels)
    or None when nothing is shared."""
    if input_ids.shape[0] != 1 or position_ids.shape != input_ids.shape:
        return None
    bounds = segment_bounds(position_ids)
    if any(int(position_ids[0, start]) != 0 for start, _ in bounds):
        return None
    prefix = common_untrained_prefix([input_ids[0, start:end] for start, end in bounds],
                                     [shift_labels[0, start:end] for start, end in bounds])
    if not prefix:
        return None
    keep = torch.ones_like(input_ids[0], dtype=torch.bool)
    for start, _ in bounds[1:]:
        keep[start:start + prefix] = False
    return input_ids[:, keep], position_ids[:, keep], shift_labels[:, keep]


def shared_untrained_prefix(input_ids: torch.Tensor, real: torch.Tensor, shift_labels: torch.Tensor) -> int:
    """`common_untrained_prefix` of the rows of a right-padded batch (`real`: its attention mask)."""
    lengths = real.sum(dim=1).tolist()
    return common_untrained_prefix([row[:n] for row, n in zip(input_ids, lengths)],
                                   [row[:n] for row, n in zip(shift_labels, lengths)])


def common_untrained_prefix(examples: list[torch.Tensor], shift_labels: list[torch.Tensor]) -> int:
    """The length of the token prefix every example begins with and trains nothing on (no label
    predicted from it), shorter than every example; 0 when under `MIN_SHARED_PREFIX` or one example."""
    limit = min(len(ids) for ids in examples) - 1
    if len(examples) < 2 or limit < MIN_SHARED_PREFIX:
        return 0
    first = examples[0][:limit]
    same = torch.ones(limit, dtype=torch.bool, device=first.device)
    for ids, labels in zip(examples, shift_labels):
        same &= (ids[:limit] == first) & (labels[:limit] == -100)
    differs = torch.nonzero(~same)
    prefix = int(differs[0]) if differs.numel() else limit
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


def reads_packed_positions(decoder, device) -> bool:
    """Whether `decoder`'s attention is `training_sdpa_forward` receiving `position_ids`: one tiny
    packed forward without gradients, in the mode the model is in (eval mode would make some layers
    change themselves: bitsandbytes repacks 4-bit weights for CPU inference), with the random
    number generators put back afterwards, so a run draws the same dropout masks with or without it."""
    before = packed_calls
    devices = [device] if torch.device(device).type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            decoder(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device),
                    position_ids=torch.tensor([[0, 1, 0, 1]], device=device), use_cache=False)
    except Exception:  # noqa: BLE001 - a probe: a model that cannot run it simply shares nothing
        return False
    return packed_calls > before


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
