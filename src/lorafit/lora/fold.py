"""Folding a layer's update into its base weight and taking it out again, for every LoRA layer kind.

A layer (`LoraLinear`, `LoraEmbedding`) provides `merged_weight()`, its base weight with the update
applied, in float32; these functions do the rest the same way for all of them: refuse quantized
weights, keep an exact copy of the original when the merge must be reversible, and restore it.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.errors import UserError


@torch.no_grad()
def fold(layer: nn.Module, keep_original: bool = True) -> None:
    """W <- the layer's merged weight; with `keep_original`, `unfold` restores W bit for bit."""
    if layer.merged:
        return
    weight = layer.base_layer.weight
    if not weight.dtype.is_floating_point:
        raise UserError("an adapter cannot be merged into quantized (4/8-bit) weights: re-quantizing would "
                        "round the update away; `lorafit merge` merges into the full-precision base")
    merged = layer.merged_weight()
    if keep_original:
        layer._unmerged_weight = weight.detach().clone()
    weight.copy_(merged.to(device=weight.device, dtype=weight.dtype))
    layer.merged = True


@torch.no_grad()
def unfold(layer: nn.Module) -> None:
    if not layer.merged:
        return
    if layer._unmerged_weight is None:
        raise RuntimeError("this layer was merged without keeping its original weight; reload the base model")
    layer.base_layer.weight.copy_(layer._unmerged_weight)
    layer._unmerged_weight = None
    layer.merged = False
