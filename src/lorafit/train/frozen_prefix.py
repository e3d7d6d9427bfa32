"""Frozen-prefix cache: each example's hidden states entering the lowest trained block, computed once.

When an adapter trains only the top blocks of a model (`--layers_to_transform "last 30%"`), the
blocks below are frozen and deterministic: nothing in them trains, and there is no dropout in them
(LoRA dropout lives in the adapted layers; the base model's own dropout rates are checked to be 0).
So an example's hidden states where the lowest trained block begins are the same in every epoch,
and recomputing them is most of a step's forward pass (the 21 lower blocks of the recipe's 30).

The first time an example is seen, its batch runs the whole model as usual and a forward pre-hook
on the lowest trained block keeps each example's hidden states there (float32 [tokens x hidden],
about 2.3 KB per token for a hidden size of 576). A batch whose examples are all kept skips the
blocks below: their states, laid out as the batch's packed row, enter the decoder as its input
embeddings with the lower blocks taken out of its layer list for that call. A batch of kept and new
examples (replay rotation's later epochs: kept task rows beside replay rows seen for the first time)
runs the frozen blocks alone over its new examples, as one packed row of them, keeps their states,
and then starts at the lowest trained block like a batch of kept ones. The result equals the
full forward pass up to float rounding (tests/train/test_frozen_prefix.py checks loss and
gradients), and from the second epoch on a step costs the trained blocks' forward and backward only.

It applies to right-padded batches taken apart into one packed row (`attention.unpad_to_packed_row`,
the trained-token loss's path) of decoder families whose forward is embeddings -> blocks -> norm
(`PLAIN_DECODER_MODEL_TYPES`), in training mode, and is off (`enable_frozen_prefix_cache` says
why) with NEFTune, gradient checkpointing, sharded training, a trained embedding, or when the
states of the whole training set would not fit in `--frozen_prefix_cache_gb`.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Model types whose decoder forward is `norm(blocks(embed(ids)))` with nothing done to the input
# embeddings on the way (Gemma scales them, for one), so states can re-enter it as `inputs_embeds`.
PLAIN_DECODER_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3"}
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "dropout")


def first_trained_block(decoder) -> int | None:
    """Index of the lowest block with a trainable parameter; None if anything below the blocks
    (the embeddings) trains or no block does."""
    if any(p.requires_grad for p in decoder.get_input_embeddings().parameters()):
        return None
    for index, block in enumerate(decoder.layers):
        if any(p.requires_grad for p in block.parameters()):
            return index
    return None


class FrozenPrefixCache:
    """The states entering block `first` of `decoder`, per example (keyed by its token ids)."""

    def __init__(self, decoder, first: int, budget_bytes: int):
        self.decoder, self.first, self.budget_bytes = decoder, first, budget_bytes
        self.states: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0
        self.partial_hits = 0  # batches of kept and new examples: the frozen blocks ran for the new ones only

    @staticmethod
    def key(ids: torch.Tensor) -> bytes:
        return hashlib.blake2b(ids.cpu().numpy().tobytes(), digest_size=16).digest()

    def decoder_forward(self, input_ids, attention_mask, row, shift_labels=None, **kwargs):
        """The decoder's output for `row` (`attention.PackedRow`), the packed form of the right-padded
        batch `input_ids` / `attention_mask` (with its `shift_labels`): from kept states when every
        example's are kept, or once the frozen blocks have run for the new ones, else by the whole
        model (keeping the states it passes)."""
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [self.key(ids[:n]) for ids, n in zip(input_ids, lengths)]
        new = [i for i, key in enumerate(keys) if key not in self.states]
        if new and len(new) < len(keys):  # some kept: the frozen blocks run for the new examples only
            self._keep_new(input_ids[new], attention_mask[new], None if shift_labels is None else shift_labels[new],
                           row.prefix > 0, [keys[i] for i in new], [lengths[i] for i in new], **kwargs)
        if all(key in self.states for key in keys):  # (unless the budget left some new ones out)
            if new:
                self.partial_hits += 1
            else:
                self.hits += 1
            return self._forward_from_states(keys, lengths, row.real, row.position_ids, **kwargs)
        self.misses += 1
        captured = []
        hook = self.decoder.layers[self.first].register_forward_pre_hook(
            lambda module, args, kw: captured.append((args[0] if args else kw["hidden_states"]).detach()),
            with_kwargs=True)
        try:
            outputs = self.decoder(input_ids=row.input_ids, position_ids=row.position_ids, **kwargs)
        finally:
            hook.remove()
        self._keep(keys, lengths, row.real, row.prefix, captured[0][0])
        return outputs

    def _keep(self, keys, lengths, real, prefix: int, packed_states: torch.Tensor) -> None:
        batch = torch.zeros((*real.shape, packed_states.shape[-1]), dtype=packed_states.dtype,
                            device=packed_states.device)
        batch[real] = packed_states
        if prefix:
            batch[1:, :prefix] = batch[0, :prefix]  # the later rows read the first row's copy
        for row, (key, length) in enumerate(zip(keys, lengths)):
            if key in self.states:
                continue
            size = length * batch.shape[-1] * batch.element_size()
            if self.bytes + size > self.budget_bytes:
                return
            self.states[key] = batch[row, :length].clone()
            self.bytes += size

    @torch.no_grad()
    def _keep_new(self, input_ids, attention_mask, shift_labels, share_prefix: bool, keys, lengths,
                  **kwargs) -> None:
        """Run the frozen blocks alone over these (right-padded) examples as one packed row (their
        common untrained prefix once, where the batch's row shares one) and keep their states (as far
        as the budget allows)."""
        from lorafit.train.attention import unpad_to_packed_row

        sub = None
        if shift_labels is not None:
            sub = unpad_to_packed_row(input_ids, attention_mask, shift_labels, share_prefix)
        if sub is not None:
            real, prefix, ids, positions = sub.real, sub.prefix, sub.input_ids, sub.position_ids
        else:  # no padding to remove: the rows end to end
            real, prefix = attention_mask.bool(), 0
            ids, positions = input_ids[real][None], (torch.cumsum(real, dim=1) - 1)[real][None]
        captured = []
        all_blocks = self.decoder.layers
        self.decoder.layers = nn.ModuleList(all_blocks[:self.first])
        hook = self.decoder.norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:  # the final norm's input is the states entering block `first`
            self.decoder(input_ids=ids, position_ids=positions, **kwargs)
        finally:
            hook.remove()
            self.decoder.layers = all_blocks
        self._keep(keys, lengths, real, prefix, captured[0][0])

    def _forward_from_states(self, keys, lengths, real, position_ids, **kwargs):
        first_state = self.states[keys[0]]
        batch = torch.zeros((*real.shape, first_state.shape[-1]), dtype=first_state.dtype, device=first_state.device)
        for row, (key, length) in enumerate(zip(keys, lengths)):
            batch[row, :length] = self.states[key]
        all_blocks = self.decoder.layers
        self.decoder.layers = nn.ModuleList(all_blocks[self.first:])
        try:
            return self.decoder(inputs_embeds=batch[real][None], position_ids=position_ids, **kwargs)
        finally:
            self.decoder.layers = all_blocks


def checkpointing(model) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5; older: is_gradient_checkpointing
    return bool(flag if flag is not None else getattr(model, "is_gradient_checkpointing", False))


def why_not(model, training_args, budget_bytes: int, tokens: int) -> str | None:
    """Why the cache cannot serve this run (None: it can)."""
    config = model.config
    if getattr(config, "model_type", None) not in PLAIN_DECODER_MODEL_TYPES:
        return f"the {getattr(config, 'model_type', '?')} decoder is not one it knows to re-enter"
    if any(getattr(config, name, 0) or 0 for name in DROPOUT_FIELDS):
        return "the base model has dropout of its own"
    if getattr(training_args, "neftune_noise_alpha", None):
        return "NEFTune adds noise to the embeddings in every step"
    if getattr(training_args, "gradient_checkpointing", False) or checkpointing(model):
        return "gradient checkpointing is on"  # its recomputation would start below the kept states
    if getattr(training_args, "deepspeed", None) or getattr(training_args, "fsdp", None):
        return "sharded training"
    if first_trained_block(model.get_decoder()) in (None, 0):
        return "the lowest block (or the embedding) trains"
    need = tokens * config.hidden_size * 4
    if need > budget_bytes:
        return f"the training set's states need {need / 2**30:.1f} GB, over --frozen_prefix_cache_gb"
    return None


def enable_frozen_prefix_cache(model, training_args, tokens: int) -> bool:
    """Give `model` (with the trained-token loss) a frozen-prefix cache for `tokens` training
    tokens if it can use one; log why not otherwise."""
    budget = int(training_args.frozen_prefix_cache_gb * 2**30)
    reason = why_not(model, training_args, budget, tokens)
    if reason is not None:
        logger.info("frozen-prefix cache off: %s", reason)
        return False
    decoder = model.get_decoder()
    model._lorafit_prefix_cache = FrozenPrefixCache(decoder, first_trained_block(decoder), budget)
    logger.info("frozen-prefix cache: blocks 0-%d are frozen; their output is computed once per example "
                "(%.0f MB for the training set) and reused in later epochs",
                model._lorafit_prefix_cache.first - 1, tokens * model.config.hidden_size * 4 / 2**20)
    return True
