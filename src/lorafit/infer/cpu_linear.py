"""On CPU, float32 linear layers through oneDNN instead of MKL's sgemm, for inference.

Decoding feeds each linear layer a handful of rows (one per request in the batch). For such short
inputs, torch's float32 `F.linear` on CPU calls MKL's sgemm, and oneDNN's inner-product primitive
(`torch.ops.mkldnn._linear_pointwise`, what `torch.compile` uses on CPU) is faster: on the 2-core
development CPU, the embedded model's linear layers take about 25% less time for 8 rows and 10%
less for one (`bench/RESULTS.md`). Both compute the same products; only the order of the float32
sums differs, so outputs agree within float32 rounding (`tests/infer/test_cpu_linear.py`).

Only exact `torch.nn.Linear` modules are switched (their class becomes `OneDNNLinear`, weights
untouched), only under inference (oneDNN's op has no backward), and only when the op is there and
answers a probe; otherwise the model is left as it is.
"""

from __future__ import annotations

import functools

import torch


class OneDNNLinear(torch.nn.Linear):
    """`nn.Linear` whose forward runs oneDNN's inner product (inference only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)  # oneDNN's op has no backward: keep autograd working
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def use_onednn_linear(model: torch.nn.Module) -> int:
    """Switch the float32 CPU `nn.Linear` layers of `model` to oneDNN; returns how many were switched."""
    if not onednn_linear_available():
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" \
                and module.weight.dtype == torch.float32:
            module.__class__ = OneDNNLinear
            switched += 1
    return switched


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    try:
        x, weight = torch.ones(2, 3), torch.ones(4, 3)
        out = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(out, torch.full((2, 4), 3.0)))
