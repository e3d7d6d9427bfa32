"""Scaling a trained update: an interpolation between the base model and the fine-tuned one.

A LoRA layer's fine-tuned weight is W + s B A. Scaling its update by t gives

    W + t s B A,

the point at t along the straight line from the base model (t = 0) to the fine-tuned one (t = 1).
For LoRA this is exactly WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot
models"), what PEFT's `peft.helpers.rescale_adapter_scale(model, t)` does for the length of a
`with` block. Fine-tuning on a narrow set (a persona, a format) tends to overshoot: the update is
larger than the task needs, and the surplus is what disturbs unrelated answers; a t below 1 keeps
most of what was learned and gives back much of what was broken (docs/train.md, "Scaling the
update"). Here the factor is applied once, to the B matrices, so the result is an ordinary adapter
that every reader (PEFT, llama.cpp, `lorafit merge`) takes as it is. A module trained in full
(`modules_to_save`) moves along the same line: W0 + t (W1 - W0).

Two kinds of adapter cannot be scaled this way, and raise: DoRA (its magnitude renormalises
W + s B A, so t = 0 is not the base) and PiSSA/OLoRA (their base holds the residual W - s B0 A0, so
the line starts elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.lora.embedding import LoraEmbedding
from lorafit.lora.init import rewrites_layer
from lorafit.lora.inject import lora_layers, saved_modules


def check_scalable(model: nn.Module) -> None:
    """Raise ValueError if some adapter in `model` is not a plain LoRA update that scaling interpolates."""
    for name, layer in lora_layers(model):
        if getattr(layer, "lora_magnitude_vector", None) is not None:
            raise ValueError(f"{name}: a DoRA layer's update cannot be scaled toward the base (its magnitude "
                             "renormalises the weight)")
        if rewrites_layer(layer):
            raise ValueError(f"{name}: a PiSSA/OLoRA layer's base holds a residual, so scaling its update does "
                             "not lead back to the base model")
        if layer.merged:
            raise ValueError(f"{name}: the adapter is merged into the base weight; unmerge it first")


@torch.no_grad()
def scale_update(model: nn.Module, factor: float) -> int:
    """Multiply every adapter update in `model` by `factor`, in place; returns how many modules moved."""
    if not factor >= 0:
        raise ValueError(f"the scale of an update must be at least 0, got {factor}")
    check_scalable(model)
    moved = 0
    for _, layer in lora_layers(model):
        b = layer.lora_embedding_B if isinstance(layer, LoraEmbedding) else layer.lora_B.weight
        b.mul_(factor)
        moved += 1
    for _, wrapper in saved_modules(model):
        for trained, original in zip(wrapper.trained.parameters(), wrapper.original_module.parameters()):
            trained.copy_(torch.lerp(original.to(trained.dtype), trained, factor))
        moved += 1
    return moved
