"""DoRA: weight-decomposed LoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

DoRA splits the adapted weight into a direction and a magnitude per output feature, and trains
both: the direction through the usual low-rank update, the magnitude as a vector m of its own:

    W' = m * (W + s B A) / ||W + s B A||_row        (||.||_row: the norm of each output row)

m starts at ||W||_row, so a fresh adapter is the base layer. Fine-tuning in full changes a weight's
magnitude and direction in different proportions, and plain LoRA cannot separate them; with m
apart, DoRA tracks full fine-tuning more closely at the same rank, most where the rank is low
(r = 4-16), for r + 1 parameters per output instead of r. As in the paper (section 4.3) and PEFT,
the row norm is treated as a constant: it is recomputed from the current A and B at every call
but gets no gradient, which saves the memory of differentiating through it and barely changes
the result.

With g = m / ||W + s B A|| and the layer's input x (dropout applies to the low-rank branch):

    y = g * (W x) + g * s B A dropout(x) + bias

which is computed as `addmm(g * base(x) + (1 - g) * bias, h, (g s B / (1 - p))^T)` with `h = (x * mask) A^T`:
g is folded into the small B, so beyond plain LoRA a DoRA layer costs one pass over its output
(`g * base(x)`) and the norms. The norms are not computed from the (out x in) matrix W + s B A,
which would be rebuilt at every call, but expanded:

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T

||W||^2 is computed once (W is frozen), W A^T is one thin matmul (out x in x r, like r tokens of
input), A A^T is r x r. In training with dropout PEFT also applies the dropout mask to the `W x`
term (`(g - 1) W dropout(x)`, a second full matmul per layer); here `W x` is not masked: the two
agree exactly in eval mode and without dropout, and have the same expectation otherwise.

PEFT's name for m is `lora_magnitude_vector` (in the file: `<module>.lora_magnitude_vector`).
Merging folds g * (W + s B A) into the weight, with g from the unmerged weight, and keeps the
original for an exact unmerge.
"""

from __future__ import annotations

import torch
from torch import nn


def _base_row_norms_squared(layer) -> torch.Tensor:
    """||W_i||^2 per output row, in float32, cached until the base weight changes (merge, PiSSA)."""
    weight = layer.base_layer.weight
    key = (weight.data_ptr(), weight._version, weight.dtype)
    cached = layer.__dict__.get("_dora_base_norms")
    if cached is None or cached[0] != key:
        dim = 0 if layer.fan_in_fan_out else 1
        norms = weight.detach().float().pow(2).sum(dim=dim)
        layer.__dict__["_dora_base_norms"] = cached = (key, norms)
    return cached[1]


@torch.no_grad()
def weight_norm(layer) -> torch.Tensor:
    """||W + s B A|| per output row (float32, no gradient), without forming W + s B A."""
    weight = layer.base_layer.weight.detach()
    a = layer.lora_A.weight.detach()
    b = layer.lora_B.weight.detach().float()
    s = layer.scaling
    # W A^T (out x r), in the base weight's dtype (a bf16 base is not copied to float32).
    wa = (a.to(weight.dtype) @ weight).t() if layer.fan_in_fan_out else weight @ a.to(weight.dtype).t()
    cross = (b * wa.float()).sum(dim=1)
    gram = a.float() @ a.float().t()
    update = ((b @ gram) * b).sum(dim=1)
    squared = _base_row_norms_squared(layer) + 2 * s * cross + s * s * update
    return squared.clamp_min(0).sqrt()


def init_magnitude(layer) -> nn.Parameter:
    """m = ||W + s B A||: the layer starts as W + s B A (the base layer when B is zero)."""
    return nn.Parameter(weight_norm(layer).to(layer.lora_A.weight.dtype))


def scale(layer) -> torch.Tensor:
    """g = m / ||W + s B A||, with the norm detached (the paper's section 4.3)."""
    return layer.lora_magnitude_vector / weight_norm(layer).to(layer.lora_magnitude_vector.dtype)


def output(layer, result: torch.Tensor, h: torch.Tensor, h_scale: float) -> torch.Tensor:
    """g * (result - bias) + bias + (g c B) h: `result` is base(x), `h` is (x * mask) A^T, and
    c = `h_scale` is s times dropout's 1 / (1 - p) (s alone without dropout)."""
    g = scale(layer)
    b = (layer.lora_B.weight * (h_scale * g).unsqueeze(1)).to(h.dtype)
    g = g.to(result.dtype)
    scaled = result * g
    bias = layer.bias
    if bias is not None:
        scaled = scaled + (1 - g) * bias.to(result.dtype)
    if scaled.dtype == h.dtype and scaled.dim() >= 2:
        flat = torch.addmm(scaled.reshape(-1, scaled.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
        return flat.view(scaled.shape)
    return scaled + torch.nn.functional.linear(h, b).to(result.dtype)


@torch.no_grad()
def merged_weight(layer) -> torch.Tensor:
    """g * (W + s B A) in the base weight's layout, float32; g from the unmerged weight."""
    g = (layer.lora_magnitude_vector.float() / weight_norm(layer))
    weight = layer.base_layer.weight.float() + layer.delta_weight().to(layer.base_layer.weight.device)
    return weight * (g.unsqueeze(0) if layer.fan_in_fan_out else g.unsqueeze(1))
