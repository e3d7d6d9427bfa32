"""The LoRA layer: a frozen linear map plus a trainable low-rank update.

For a frozen weight W (out x in), LoRA (Hu et al., 2021) learns the update as a product of two
thin matrices, A (r x in) and B (out x r), with r much smaller than in and out:

    y = W x + (alpha / r) * B A dropout(x)

Only A and B train: r * (in + out) parameters instead of in * out. B starts at zero, so at step 0
the layer is exactly the base layer; A starts Kaiming-uniform (PEFT's default) or Gaussian with
std 1/r, so gradients reach B from the first step. `alpha / r` keeps the update's size roughly
independent of the rank (rsLoRA uses `alpha / sqrt(r)`, which stays stable at high ranks).
Merging folds the update into the weight, W' = W + (alpha / r) B A, after which the layer costs
nothing extra at inference.

Dtype policy (the one place it is stated): the base weight stays in its load dtype; A and B are
stored in `adapter_dtype` (float32 by default, as master weights for the optimizer) and cast to
the activation's dtype at use, which costs r * (in + out) elements per call. The activation is
never upcast: that upcast is what makes PEFT's bf16 path 20-30% slower. Under autocast the matmuls
follow autocast as usual. The loss is computed in float32 by the model.

GPT-2's `Conv1D` stores W as (in x out) (`fan_in_fan_out`); A and B keep the usual shapes, and
only merging needs the transpose.

How the update is computed, cheaply and exactly: dropout's mask is cheap (`lora/dropout.py`), its
`1 / (1 - p)` scale and `alpha / r` are one scalar that the second matmul applies (`addmm`'s
alpha) as it adds the update to the base output, instead of passes over the large activations,
so an adapted layer costs two thin matmuls and one mask over its input. Layers that read the same input (q/k/v,
gate/up) share that mask and the first matmul (`lora/shared_input.py`); `low_rank_input` below is
the plain path each group must equal. In training, a layer (or its group) runs as one autograd node
whose backward builds the input's gradient in one buffer (`lora/fused.py`); `forward` below, past
its first lines, is the plain path that node must equal.

Variants are composed in, one module per idea: DoRA's magnitude (`lora/dora.py`), PiSSA/OLoRA
initialisation (`lora/init.py`); LoRA on embeddings is its own small layer (`lora/embedding.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.errors import UserError
from lorafit.lora import dora, fused
from lorafit.lora.config import rewrites_base
from lorafit.lora.dropout import InputDropout
from lorafit.lora.fold import fold, unfold
from lorafit.lora.init import rewrite_base


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of an nn.Linear or a GPT-2 style Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        in_features, out_features = module.weight.shape
        return in_features, out_features, True
    raise TypeError(f"LoRA wraps nn.Linear or Conv1D layers, not {type(module).__name__}")


class LoraLinear(nn.Module):
    """Wraps (does not subclass) a linear layer: `base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 scaling: float | None = None, init_lora_weights: bool | str = True,
                 adapter_dtype: torch.dtype | None = None, use_dora: bool = False):
        super().__init__()
        in_features, out_features, fan_in_fan_out = linear_shape(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = fan_in_fan_out
        self.r, self.lora_alpha = r, lora_alpha
        self.scaling = lora_alpha / r if scaling is None else scaling
        self.lora_dropout = InputDropout(lora_dropout)
        self.shared_input = None  # a SharedInputGroup when siblings read the same input
        self.fused = True  # train through lora/fused.py's single autograd node where it applies
        device = base_layer.weight.device
        base_dtype = base_layer.weight.dtype  # packed integers for a quantized (QLoRA) base
        dtype = adapter_dtype or (torch.float32 if base_dtype in (torch.float16, torch.bfloat16)
                                  or not base_dtype.is_floating_point else base_dtype)
        if not base_dtype.is_floating_point and (use_dora or rewrites_base(init_lora_weights)):
            key = "use_dora" if use_dora else f"init_lora_weights={init_lora_weights}"
            raise UserError(f"{key} needs the base weight itself, and this base is quantized (4/8-bit): "
                            "train it on the full-precision base")
        if device.type == "meta":
            device = None
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None  # exact copy kept by a reversible merge
        self.reset_lora_parameters(init_lora_weights)
        # DoRA's magnitude m (lora/dora.py), set from W + s B A once A, B (and a PiSSA base) are final.
        self.lora_magnitude_vector = dora.init_magnitude(self) if use_dora else None

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        if rewrites_base(init_lora_weights):  # PiSSA, OLoRA: A and B from W, W keeps the residual
            if getattr(self, "initial_A", None) is not None:
                raise RuntimeError("this layer's base already holds a PiSSA/OLoRA residual; start from a fresh base")
            rewrite_base(self, init_lora_weights)
            return
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            if init_lora_weights is False:  # a random, non-identity start (tests, research)
                nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, so code that inspects `module.weight` keeps working."""
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's tensors under the names PEFT's files use after `<module path>.`."""
        tensors = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.lora_magnitude_vector is not None:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector
        return tensors

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The adapter computes in the activation's dtype, or autocast's when it is on."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def low_rank_input(self, x: torch.Tensor) -> torch.Tensor:
        """`(x * mask) A^T`, the r-wide input of B before dropout's `1 / (1 - p)` (the plain path;
        groups compute it together); `forward` applies that scale with `alpha / r`."""
        a = self.lora_A.weight.to(self.compute_dtype(x))
        return F.linear(self.lora_dropout.masked(x).to(a.dtype), a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # training: one autograd node for the layer (or its group), the same function (lora/fused.py)
        group = self.shared_input
        if group is not None and group.fusable(x):
            return group.output(self, x)
        if group is None and fused.fusable(self, x):
            return fused.fused_outputs([self], x, self.lora_dropout)[0]
        result = self.base_layer(x)
        if self.merged:
            return result
        if self.shared_input is not None:
            h = self.shared_input.low_rank_input(self, x)
        else:
            h = self.low_rank_input(x)
        # alpha / r and dropout's 1 / (1 - p) are one scalar, applied inside the GEMM below.
        scale = self.scaling * (self.lora_dropout.keep_scale if self.lora_dropout.active else 1.0)
        if self.lora_magnitude_vector is not None:
            return dora.output(self, result, h, scale)
        b = self.lora_B.weight.to(h.dtype)
        if result.dtype == h.dtype and result.dim() >= 2:
            # result + scale * h B^T in one GEMM (beta = 1, alpha = scale): no pass over the output to
            # scale or add the update, no pass over B to scale it.
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
            return flat.view(result.shape)
        return result + (F.linear(h, b) * scale).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in the base weight's layout, computed in float32."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self) -> torch.Tensor:
        """The base weight with this update folded in, float32 (DoRA: m times the normalised direction)."""
        if self.lora_magnitude_vector is not None:
            return dora.merged_weight(self)
        weight = self.base_layer.weight
        return weight.float() + self.delta_weight().to(weight.device)

    def merge(self, keep_original: bool = True) -> None:
        """Fold the update into the base weight; with `keep_original`, `unmerge` restores it exactly."""
        fold(self, keep_original)

    def unmerge(self) -> None:
        unfold(self)

    def extra_repr(self) -> str:
        dora_note = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:g}{dora_note}, merged={self.merged}"


class ModulesToSave(nn.Module):
    """A module trained in full: a trainable copy beside the frozen original (PEFT's layout and names).

    PEFT names the copy `modules_to_save.default`; its files store it as `<path>.weight`. Keeping the original allows an exact un-merge and keeps the
    parameter count identical to PEFT's.
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        import copy

        self.original_module = original_module
        self.original_module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(original_module)})
        self.modules_to_save["default"].requires_grad_(True)

    @property
    def trained(self) -> nn.Module:
        return self.modules_to_save["default"]

    @property
    def weight(self) -> torch.Tensor:
        return self.trained.weight

    def forward(self, *args, **kwargs):
        return self.trained(*args, **kwargs)
