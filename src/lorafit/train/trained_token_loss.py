"""The loss of a causal LM at its trained positions only, without ever holding the full logits.

A Hugging Face causal LM computes `logits = lm_head(hidden)` for every position of the batch, a
`[tokens x vocab]` float32 tensor (0.6 GB for 3,200 tokens at SmolLM2's 49k vocabulary), then its
log-softmax and, in the backward pass, a gradient of the same size: the largest tensors of an SFT
step, mostly spent on prompt positions whose label is -100 and which teach nothing.

`trained_token_loss` computes the same number, `sum over trained positions of
logsumexp(logits) - logit[target]`, divided like the stock loss (by `num_items_in_batch` when the
Trainer passes it, else by the count of trained tokens), but:

* only at positions whose (shifted) label is not -100: hidden states are gathered first, so the
  head's matmul runs over trained tokens only;
* in chunks of rows: each chunk's logits live only while the chunk is processed;
* with the gradient computed in the forward pass (softmax - one-hot is the gradient of the
  logits), so the backward pass is one multiply by the incoming scalar and nothing of
  `[tokens x vocab]` size is kept for it.

It is exact (tests/train/test_trained_token_loss.py checks loss and gradients against the model's
own loss), and `use_trained_token_loss(model)` switches a model to it (and, when the model uses
lorafit's training attention, takes right-padded batches apart into one packed row first, so
padding costs neither time nor memory: `lorafit.train.attention.unpad_to_packed_row`) for architectures whose head
is a plain linear layer (no logit soft-capping or scaling, no auxiliary router loss); any other
model keeps its own loss.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from lorafit.data.collate import SOFT_TARGET_IDS, SOFT_TARGET_WEIGHTS
from lorafit.lora import ModulesToSave
from lorafit.train import attention
from lorafit.train.replay_token_penalty import TokenPenalty, penalty_chunk

IGNORE_INDEX = -100
# Logits per chunk: 32M floats (128 MB in float32), ~680 rows at a 49k vocabulary. Each chunk reads
# the whole head weight twice (logits, gradient), so chunks of a few rows would be bound by
# streaming the weight; ~700 rows keep the matmuls efficient at a tenth of the full logits' size.
CHUNK_ELEMENTS = 1 << 25
_buffers: dict[tuple, torch.Tensor] = {}  # one logits buffer per (device, dtype), reused across steps

# Model types whose causal-LM forward is `lm_head(decoder(...).last_hidden_state)` + the standard
# shifted cross-entropy. (Config flags that change the head are checked too, see `supports`.)
PLAIN_HEAD_MODEL_TYPES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi3", "olmo",
    "olmo2", "gpt2", "smollm3", "starcoder2", "stablelm", "gpt_neox",
}
HEAD_CHANGING_FLAGS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits")


def _logits_buffer(rows: int, vocab: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A [rows x vocab] buffer for every chunk of every step: no fresh pages to map at each call."""
    key = (torch.device(device), dtype)
    buffer = _buffers.get(key)
    if buffer is None or buffer.numel() < rows * vocab:
        buffer = _buffers[key] = torch.empty(rows * vocab, dtype=dtype, device=device)
    return buffer[: rows * vocab].view(rows, vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i (logsumexp(h_i W^T) - sum_j w_ij (h_i W^T)[t_ij]) / denominator, chunked, gradients in forward.

    `targets` is [n, k]: one token per row (k = 1, `weights` None: the plain cross-entropy) or a
    target distribution over k tokens per row with `weights` [n, k] (soft targets: the cross-entropy
    to that distribution; a hard row is token t at weight 1, the rest 0). A row whose weights sum
    to s counts s times: loss s * logsumexp(z) - sum_j w_j z_j, gradient s * softmax(z) - w.
    `penalty` (a TokenPenalty and the [n] bool rows it applies to) adds its term at those rows
    (`lorafit.train.replay_token_penalty`)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, denominator, chunk_rows, penalty=None):
        needs_hidden_grad, needs_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_dtype = torch.promote_types(weight.dtype, torch.float32)  # the loss is at least float32
        grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=loss_dtype, device=weight.device) if needs_weight_grad else None
        total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        denominator = denominator.to(loss_dtype)
        buffer = _logits_buffer(min(chunk_rows, hidden.shape[0]), weight.shape[0], loss_dtype, hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start:start + chunk_rows]
            chunk_targets = targets[start:start + chunk_rows]
            chunk_weights = None if weights is None else weights[start:start + chunk_rows].to(loss_dtype)
            logits = buffer[: rows.shape[0]]
            if weight.dtype == loss_dtype:
                torch.mm(rows.to(loss_dtype), weight.T, out=logits)
            else:
                logits.copy_(rows @ weight.T)
            # loss = log(sum(exp(logits - max))) - sum_j w_j (logit[t_j] - max), all passes in place
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            target_logits = logits.gather(1, chunk_targets)
            row_scale = 1.0 if chunk_weights is None else chunk_weights.sum(dim=-1, keepdim=True)
            if chunk_weights is not None:
                target_logits = (target_logits * chunk_weights).sum(dim=-1, keepdim=True)
            sums = logits.exp_().sum(dim=-1, keepdim=True)
            total += (sums.log() * row_scale - target_logits).sum()
            held = None
            if penalty is not None:
                held_loss, held_count, held = penalty_chunk(logits, sums, chunk_targets, chunk_weights,
                                                            penalty[1][start:start + chunk_rows], penalty[0])
                total += held_loss
                row_scale = row_scale - held_count  # its gradient: weight * (onehot(held) - count * softmax)
            if needs_hidden_grad or needs_weight_grad:
                # d loss / d logits = (scale * softmax - target distribution) / denominator
                # (one pass; a coefficient of 0 divides by inf, giving the 0 it should)
                grad_logits = logits.div_(sums * denominator / row_scale)
                if held is not None:
                    grad_logits.index_add_(1, penalty[0].token_ids.to(logits.device), held / denominator)
                pull = -1.0 if chunk_weights is None else -chunk_weights
                grad_logits.scatter_add_(1, chunk_targets,
                                         torch.zeros(chunk_targets.shape, dtype=loss_dtype, device=logits.device)
                                         .add_(pull) / denominator)
                if needs_hidden_grad:
                    grad_hidden[start:start + chunk_rows] = grad_logits.to(weight.dtype) @ weight
                if needs_weight_grad:
                    grad_weight += grad_logits.T @ rows.to(loss_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / denominator.to(loss_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def shift(labels: torch.Tensor) -> torch.Tensor:
    """Position i's label becomes the target of position i - 1 (the last position has none)."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def trained_token_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                       num_items_in_batch=None, shift_labels: torch.Tensor | None = None,
                       chunk_elements: int = CHUNK_ELEMENTS, soft_targets=None,
                       penalty: TokenPenalty | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the trained positions of `hidden` ([batch, seq, dim]).

    `labels` are unshifted (as passed to the model); `shift_labels` already shifted. The division is
    the stock loss's: by `num_items_in_batch` when given, else by the number of trained tokens.
    `soft_targets` (token ids [n, k], weights [n, k]), one row per trained position in row-major
    order, replaces the label of every row whose weights are not all zero by that distribution:
    the cross-entropy to it, the row counting as much as its weights sum to (1 for a probability
    distribution; see `soft_target_rows`). `penalty` applies at those soft rows only.
    """
    if shift_labels is None:
        shift_labels = shift(labels)
    shift_labels = shift_labels.to(hidden.device)
    trained = shift_labels != IGNORE_INDEX
    rows = hidden[trained]
    targets = shift_labels[trained][:, None]
    weights = held = None
    if soft_targets is not None:
        targets, weights, soft = soft_target_rows(targets[:, 0], *soft_targets)
        held = None if penalty is None else (penalty, soft[:, 0])
    if num_items_in_batch is None:
        denominator = torch.clamp(trained.sum(), min=1).to(torch.float32)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).to(torch.float32)
    chunk_rows = max(1, chunk_elements // weight.shape[0])
    return _LinearCrossEntropy.apply(rows, weight, targets, weights, denominator, chunk_rows, held)


def soft_target_rows(labels: torch.Tensor, token_ids: torch.Tensor, weights: torch.Tensor):
    """[n, k] target tokens and weights: row i is `token_ids[i]` at `weights[i]` where those are
    not all zero, else `labels[i]` at weight 1; and which rows are soft ([n, 1] bool)."""
    if token_ids.shape[0] != labels.shape[0]:
        raise ValueError(f"soft targets for {token_ids.shape[0]} positions, but the batch trains {labels.shape[0]}")
    token_ids, weights = token_ids.to(labels.device), weights.to(labels.device)
    soft = (weights != 0).any(dim=-1, keepdim=True)
    hard_ids = torch.zeros_like(token_ids)
    hard_ids[:, 0] = labels
    hard_weights = torch.zeros_like(weights)
    hard_weights[:, 0] = 1.0
    return torch.where(soft, token_ids, hard_ids), torch.where(soft, weights, hard_weights), soft


def supports(model) -> bool:
    """Whether `model`'s loss is the plain head + shifted cross-entropy this module reproduces."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return False
    if any(getattr(config, flag, None) for flag in HEAD_CHANGING_FLAGS):
        return False
    return head_weight(model) is not None and hasattr(model, "get_decoder")


def head_weight(model) -> torch.Tensor | None:
    """The output head's weight when the head is a bias-free linear map (trained in full or frozen)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, ModulesToSave):  # --modules_to_save lm_head: the trained copy is the head
        head = head.trained
    if isinstance(head, torch.nn.Linear) and head.bias is None:
        return head.weight
    return None  # a LoRA-adapted or biased head: the model's own loss


def use_trained_token_loss(model) -> bool:
    """Make `model(..., labels=...)` compute `trained_token_loss` (no logits returned); False if unsupported.

    The model's own forward still runs when no labels are given (generation, inference), so only
    the loss computation changes. The signature is kept, so the Trainer's column filtering and
    `num_items_in_batch` detection see the original forward.
    """
    if not supports(model):
        return False
    original = model.forward

    @functools.wraps(original.__func__)  # the unbound function, so the signature keeps its `self`
    def forward(self, input_ids=None, *, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                num_items_in_batch=None, shift_labels=None, logits_to_keep=0, **kwargs):
        if labels is None and shift_labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep, **kwargs)
        kwargs.pop("use_cache", None)
        kwargs.pop("return_dict", None)
        soft_targets = pop_soft_targets(kwargs)
        if shift_labels is None:
            shift_labels = shift(labels)
        outputs = None
        if input_ids is not None and self.config._attn_implementation == attention.NAME:
            # A shared prefix only for a model whose attention takes packed rows apart by their
            # position_ids (otherwise the later examples would not see it): probed once, the same
            # way in a resumed run as in the whole one.
            if getattr(self, "_lorafit_shares_prefix", None) is None:
                self._lorafit_shares_prefix = attention.reads_packed_positions(self.get_decoder(), input_ids.device)
            if attention_mask is not None and position_ids is None:
                row = attention.unpad_to_packed_row(input_ids, attention_mask, shift_labels,
                                                    self._lorafit_shares_prefix)
                if row is not None:
                    prefix_cache = getattr(self, "_lorafit_prefix_cache", None)
                    if prefix_cache is not None and self.training and inputs_embeds is None:
                        # the frozen blocks' output, kept from the first epoch (lorafit.train.frozen_prefix)
                        outputs = prefix_cache.decoder_forward(input_ids, attention_mask, row, shift_labels,
                                                               use_cache=False, **kwargs)
                    input_ids, position_ids, shift_labels, attention_mask = (row.input_ids, row.position_ids,
                                                                             row.shift_labels, None)
            elif attention_mask is None and position_ids is not None and self._lorafit_shares_prefix:  # --packing
                shared = attention.share_packed_prefix(input_ids, position_ids, shift_labels)
                if shared is not None:
                    input_ids, position_ids, shift_labels = shared
        if outputs is None:
            outputs = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=False,
                                         **kwargs)
        loss = trained_token_loss(outputs.last_hidden_state, None, head_weight(self),
                                  num_items_in_batch=num_items_in_batch, shift_labels=shift_labels,
                                  soft_targets=soft_targets, penalty=getattr(self, "_lorafit_token_penalty", None))
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = types.MethodType(forward, model)
    model._lorafit_trained_token_loss = True
    return True


def pop_soft_targets(kwargs: dict):
    """The batch's soft targets (replay distillation, lorafit.train.replay_targets), taken out of `kwargs`."""
    ids, weights = kwargs.pop(SOFT_TARGET_IDS, None), kwargs.pop(SOFT_TARGET_WEIGHTS, None)
    return None if ids is None else (ids, weights)


def uses_trained_token_loss(model) -> bool:
    """Whether `use_trained_token_loss` switched `model` over (soft targets need it)."""
    return bool(getattr(model, "_lorafit_trained_token_loss", False))
