"""Dropout on the adapter's input, with a mask that costs a fraction of `nn.Dropout`'s.

`nn.Dropout` draws one random number per element (`bernoulli_`); on a CPU that was 14-16% of a
LoRA training step, across the ~200 adapted layers of a small model. Here one 64-bit random
integer gives four 16-bit ones, and an element is kept when its 16-bit number is at or above a
threshold: the drop probability is `p` rounded to a multiple of 1/65536 (0.05 -> 0.0500031), and
the kept elements are scaled by `1 / (1 - that p)`, so the expectation is exactly `x` as with
`nn.Dropout`.

Where the random integers come from: on a GPU, torch's generator (Philox, in parallel). On a CPU
torch's generator is a single-threaded Mersenne Twister; numpy's PCG64-DXSM makes the same number
of bits in less than half the time, so a CPU mask draws one 62-bit seed from torch's default
generator and lets PCG64-DXSM expand it. Either way every bit descends from torch's generator, so
seeding, the Trainer's checkpointed RNG state (exact resume) and gradient checkpointing's replay of
the forward pass see the same masks, as with any torch random op. The mask is a bool tensor and is
applied with `where(mask, x, 0)`, forward and (autograd's `where` backward) backward: one byte per
element kept for the backward pass instead of four, at the speed of the same-dtype multiply by a
float mask it replaced (multiplying by the bool mask itself would go through a type-promoting loop
that costs twice as much), and no pass copying the comparison's result into a float tensor.

The scale is not applied here: the LoRA layer folds it into the scalar its second matmul applies
anyway (`addmm`'s alpha) instead of paying an extra pass over the (large) input:
`s B dropout(x) A^T = (s / (1 - p)) B (x * mask) A^T`.
"""

from __future__ import annotations

import numpy as np
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
        """True where an element is kept, False where it is dropped, in x's shape."""
        return torch.ge(random_int16(x.numel(), x.device).view(x.shape), self.threshold)

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        """`~mask(x)`, from the same random numbers: True where an element is dropped."""
        return torch.lt(random_int16(x.numel(), x.device).view(x.shape), self.threshold)

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """x where kept, 0 where dropped, unscaled (the caller applies `keep_scale`); x itself when inactive."""
        return torch.where(self.mask(x), x, 0.0) if self.active else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The usual, scaled dropout (for callers that do not fold the scale elsewhere)."""
        return self.masked(x) * self.keep_scale if self.active else x

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


def random_int16(numel: int, device: torch.device) -> torch.Tensor:
    """`numel` uniform 16-bit integers, every bit descended from torch's default generator."""
    if torch.compiler.is_compiling():  # torch.compile traces neither numpy's generator nor a dtype view
        return torch.randint(_INT16_MIN, -_INT16_MIN, (numel,), dtype=torch.int16, device=device)
    if device.type == "cpu":
        seed = int(torch.randint(0, 1 << 62, (1,)).item())
        words = np.random.PCG64DXSM(seed).random_raw((numel + 3) // 4)
        return torch.from_numpy(words.view(np.int16)[:numel])
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    # random_(from, to) draws from [from, to): every bit pattern but one (1 in 2^64), uniform.
    return words.random_(-(1 << 63), (1 << 63) - 1).view(torch.int16)[:numel]
