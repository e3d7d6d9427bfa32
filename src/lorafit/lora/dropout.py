"""Dropout on the adapter's input, with a mask that costs a quarter of `nn.Dropout`'s random numbers.

`nn.Dropout` draws one random number per element (`bernoulli_`); on a CPU that was 14-16% of a
LoRA training step, across the ~200 adapted layers of a small model. Here one 64-bit random
integer gives four 16-bit ones, and an element is kept when its 16-bit number is at or above a
threshold: the drop probability is `p` rounded to a multiple of 1/65536 (0.05 -> 0.0500031), and
the kept elements are scaled by `1 / (1 - that p)`, so the expectation is exactly `x` as with
`nn.Dropout`. The numbers come from torch's default generator, so seeding and the Trainer's
checkpointed RNG state make runs (and resumed runs) reproducible as before.

The scale is not applied here: callers fold it into the (small) A matrix instead of paying an
extra pass over the (large) input: `dropout(x) A^T = (x * mask) (A / (1 - p))^T`.
"""

from __future__ import annotations

import torch
from torch import nn

LEVELS = 1 << 16  # 16-bit random numbers
_INT16_MIN = -(1 << 15)


class InputDropout(nn.Module):
    """`mask(x)` keeps each element with probability `1 - p`; `keep_scale` is `1 / (1 - p)`."""

    def __init__(self, p: float):
        super().__init__()
        dropped_levels = round(p * LEVELS)
        if p > 0 and dropped_levels == 0:
            dropped_levels = 1  # a tiny p stays a (tiny) dropout rather than silently none
        self.p = dropped_levels / LEVELS
        self.threshold = _INT16_MIN + dropped_levels
        self.keep_scale = LEVELS / (LEVELS - dropped_levels)

    @property
    def active(self) -> bool:
        return self.training and self.p > 0

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        numel = x.numel()
        words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=x.device)
        # random_(from, to) draws from [from, to): every bit pattern but one (1 in 2^64), uniform.
        noise = words.random_(-(1 << 63), (1 << 63) - 1).view(torch.int16)[:numel]
        return (noise >= self.threshold).view(x.shape)

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """x * mask, unscaled (the caller scales A by `keep_scale`); x itself when inactive."""
        return x * self.mask(x) if self.active else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The usual, scaled dropout (for callers that do not fold the scale elsewhere)."""
        return self.masked(x) * self.keep_scale if self.active else x

    def extra_repr(self) -> str:
        return f"p={self.p:g}"
