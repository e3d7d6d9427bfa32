"""Examples -> batches: dynamic padding, or packing several examples into one row.

Padding (`PaddingCollator`): each batch is padded on the right to its longest example (rounded up
to ``--pad_to_multiple_of``). Padding is excluded from attention by ``attention_mask`` and from the
loss by ``labels = -100``, both decided by position, never by comparing token ids to the pad id:
when pad == eos (SmolLM2's ``<|im_end|>``) the real end-of-turn tokens keep their labels.

Packing (`PackingCollator`): the batch's examples are concatenated into one row of shape [1, N]
with ``position_ids`` restarting at 0 for every example and no ``attention_mask``; the first label of
each example is -100 so no example is trained to predict the next one's first token. transformers
(>= 4.56, checked on 5.x) reads the restarts in ``position_ids``: the sdpa/eager/flex mask builders
make the causal mask block-diagonal, and flash-attention uses its varlen kernel, so no token attends
across an example boundary and the loss equals the unpacked loss (tests/data/test_collate.py checks
both on a tiny model). This is the layout of `transformers.DataCollatorWithFlattening`.

One condition: transformers looks for those restarts only when the forward pass builds no KV cache.
With ``use_cache=True`` (most configs' default) the packed examples silently attend to each other.
The transformers 5 Trainer sets ``model.config.use_cache = args.use_cache`` (False by default); any
other loop must call `prepare_model_for_packing(model)` (or pass ``use_cache=False``).

Soft targets (replay distillation, `lorafit.train.replay_targets`): examples may carry
``soft_target_ids`` / ``soft_target_weights``, one [K]-row per trained position: the tokens and
their weights in the target (an empty list: the example keeps its labels). Both collators stack
them in the order of the batch's trained positions, row after row, which is the order the loss
reads them in, with zero rows (no soft target) for examples without; a batch with none gets no
soft-target keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.data.errors import DataConfigError
from lorafit.data.render import IGNORE_INDEX

SOFT_TARGET_IDS, SOFT_TARGET_WEIGHTS = "soft_target_ids", "soft_target_weights"


def _round_up(length: int, multiple: int | None) -> int:
    return -(-length // multiple) * multiple if multiple else length


@dataclass
class PaddingCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = _round_up(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature.get("labels", feature["input_ids"]), dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **soft_targets(features)}


@dataclass
class PackingCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, labels, position_ids = [], [], []
        for feature in features:
            ids = list(feature["input_ids"])
            example_labels = list(feature.get("labels", ids))
            input_ids += ids
            labels += [IGNORE_INDEX] + example_labels[1:]
            position_ids += range(len(ids))
        filler = _round_up(len(input_ids), self.pad_to_multiple_of) - len(input_ids)
        if filler:  # a separate, untrained "example" of padding, so it cannot touch real tokens
            input_ids += [self.pad_token_id] * filler
            labels += [IGNORE_INDEX] * filler
            position_ids += range(filler)
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            **soft_targets(features),
        }


def soft_targets(features: list[dict]) -> dict[str, torch.Tensor]:
    """The batch's soft targets, [trained positions x K] ids and weights (module docstring)."""
    if not any(feature.get(SOFT_TARGET_IDS) for feature in features):
        return {}
    width = next(len(feature[SOFT_TARGET_IDS][0]) for feature in features if feature.get(SOFT_TARGET_IDS))
    ids, weights = [], []
    for feature in features:
        labels = feature.get("labels", feature["input_ids"])
        trained = sum(label != IGNORE_INDEX for label in labels[1:])
        rows = feature.get(SOFT_TARGET_IDS) or []
        if rows:
            if len(rows) != trained:
                raise ValueError(f"an example has soft targets for {len(rows)} positions but trains {trained}")
            ids.append(torch.as_tensor(rows, dtype=torch.long))
            weights.append(torch.as_tensor(feature[SOFT_TARGET_WEIGHTS], dtype=torch.float32))
        else:
            ids.append(torch.zeros((trained, width), dtype=torch.long))
            weights.append(torch.zeros((trained, width), dtype=torch.float32))
    return {SOFT_TARGET_IDS: torch.cat(ids), SOFT_TARGET_WEIGHTS: torch.cat(weights)}


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataConfigError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return pad


def build_collator(data_args, tokenizer):
    """The `data_collator` for the Trainer or a DataLoader: packing when --packing, else padding."""
    collator = PackingCollator if data_args.packing else PaddingCollator
    return collator(pad_token_id(tokenizer), data_args.pad_to_multiple_of)


def prepare_model_for_packing(model):
    """Turn the KV cache off, without which transformers cannot see packed example boundaries."""
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    return model
