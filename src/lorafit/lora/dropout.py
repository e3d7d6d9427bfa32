"""Dropout on the adapter's input, drawn as the positions of the dropped elements.

`nn.Dropout` draws one random number per element (`bernoulli_`) and multiplies by a full-size
mask; on a CPU that was 14-16% of a LoRA training step across the ~200 adapted layers of a small
model. At the usual p (0.05-0.1) nearly every element is kept, so this module draws only where the
dropped ones are: the gaps between consecutive dropped elements of an i.i.d. Bernoulli(p) sequence
are geometric, `P(gap = g) = (1 - p)^(g - 1) p`, and one uniform number gives one gap by inversion,

    gap = floor(log(u) / log(1 - p)) + 1,    positions = cumsum(gaps) - 1,

so a mask over n elements costs about `n p` random numbers instead of n. The uniforms are 32-bit
(`u = (k + 1/2) / 2^32`), so each gap's probabilities are those of the exact geometric law to
within 2^-32, and p is used as given (not rounded). The kept elements are scaled by `1 / (1 - p)`,
so the expectation is exactly `x` as with `nn.Dropout`.

Where the random bits come from: on a GPU, torch's generator (Philox, in parallel). On a CPU
torch's generator is a single-threaded Mersenne Twister; numpy's PCG64-DXSM is faster, so a CPU
mask draws PCG64-DXSM's 128-bit state from torch's default generator and lets it expand that. Either way
every bit descends from torch's generator, so seeding, the Trainer's checkpointed RNG state (exact
resume) and gradient checkpointing's replay of the forward pass see the same masks, as with any
torch random op. Under torch.compile, which traces neither numpy's generator nor a mask whose size
depends on the draw, the mask is `rand_like(x) >= p`: the same law, other numbers.

Positions (sorted int64 indices into x's elements in row-major order) are also what autograd keeps
for the backward pass: 8 bytes per dropped element, 0.4 bytes per element at p = 0.05, where a bool
mask takes 1. `masked(x)` zeroes them in a copy of x (the plain path); the fused node
(`lora/fused.py`) zeroes them in x itself around the two thin matmuls that read it and puts them back.

The scale is not applied here: the LoRA layer folds it into the scalar its second matmul applies
anyway (`addmm`'s alpha) instead of paying an extra pass over the (large) input:
`s B dropout(x) A^T = (s / (1 - p)) B (x * mask) A^T`.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch import nn

_UNIFORM_BITS = 32
_EXTRA_DRAWS_SIGMAS = 8  # draw enough gaps to cover n elements but in ~1e-15 of calls


class InputDropout(nn.Module):
    """`dropped_positions(x)` are the elements to zero, each with probability p; `keep_scale` is `1 / (1 - p)`."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
        self.p = float(p)

    @property
    def keep_scale(self) -> float:
        return 1.0 / (1.0 - self.p)

    @property
    def active(self) -> bool:
        return self.training and self.p > 0

    def dropped_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Sorted flat indices (int64, on x's device) of the elements of x to drop, x read in row-major order."""
        return drop_positions(x.numel(), self.p, x.device)

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """x with the dropped elements zeroed, unscaled (the caller applies `keep_scale`); x itself when inactive."""
        if not self.active:
            return x
        if torch.compiler.is_compiling():
            return torch.where(torch.rand_like(x, dtype=torch.float32) >= self.p, x, 0.0)
        return x.flatten().index_fill(0, self.dropped_positions(x), 0.0).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The usual, scaled dropout (for callers that do not fold the scale elsewhere)."""
        return self.masked(x) * self.keep_scale if self.active else x

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


def drop_positions(numel: int, p: float, device: torch.device) -> torch.Tensor:
    """Where an i.i.d. Bernoulli(p) sequence of `numel` trials succeeds: sorted int64 indices."""
    if p <= 0.0 or numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    parts, last = [], -1  # `last`: the position of the last drop found so far
    while True:
        remaining = numel - last - 1
        count = int(remaining * p + _EXTRA_DRAWS_SIGMAS * math.sqrt(remaining * p * (1 - p)) + 16)
        positions = torch.cumsum(geometric_gaps(count, p, device), 0).add_(last)
        inside = int(torch.searchsorted(positions, numel))
        parts.append(positions[:inside])
        if inside < count:
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        last = int(positions[-1])


def geometric_gaps(count: int, p: float, device: torch.device) -> torch.Tensor:
    """`count` draws of the gap between Bernoulli(p) successes (1, 2, ...), as int64 on `device`."""
    if device.type in ("cpu", "mps"):  # mps: no float64 there, so the CPU draws (and its generator)
        scale, offset = _gap_formula(p)
        gaps = np.log(_cpu_uint32(count) + 0.5)  # float64
        gaps *= scale
        gaps += offset
        return torch.from_numpy(gaps.astype(np.int64)).to(device)  # >= 1, so truncation is floor
    return _torch_gaps(count, p, device)


def _torch_gaps(count: int, p: float, device: torch.device) -> torch.Tensor:
    """`geometric_gaps` with torch's generator and operators (accelerators; tested on the CPU)."""
    scale, offset = _gap_formula(p)
    words = torch.empty((count + 1) // 2, dtype=torch.int64, device=device)
    # random_(from, to) draws from [from, to): every bit pattern but one (1 in 2^64), uniform.
    k = words.random_(-(1 << 63), (1 << 63) - 1).view(torch.int32)[:count].double().add_(2.0 ** 31 + 0.5)
    return torch.log(k).mul_(scale).add_(offset).long()


def _gap_formula(p: float) -> tuple[float, float]:
    """(scale, offset) with `gap = floor(scale * log(k + 1/2) + offset)` for a uniform 32-bit integer k.

    The inversion `gap = floor(log(u) / log(1 - p)) + 1` with `u = (k + 1/2) / 2^32`, whose
    `log(u) = log(k + 1/2) - 32 log 2` folds into one multiply-add."""
    scale = 1.0 / math.log1p(-p)  # negative
    return scale, 1.0 - _UNIFORM_BITS * math.log(2.0) * scale


_cpu_generator = threading.local()


def _cpu_uint32(count: int) -> np.ndarray:
    """`count` uniform 32-bit integers (numpy uint32) whose seed is drawn from torch's default generator."""
    bits = getattr(_cpu_generator, "bits", None)
    if bits is None:
        # seeded, so that its stream constant (`inc`) is the same in every process; the state
        # itself is set from torch's generator below, before each draw
        bits = _cpu_generator.bits = np.random.PCG64DXSM(0)
        _cpu_generator.state = bits.state
    high, low = torch.randint(0, (1 << 63) - 1, (2,)).tolist()
    state = _cpu_generator.state
    # a full-width 128-bit state (PCG64-DXSM's first output from a state with its high half zero is
    # zero); setting it costs ~1 us where building a seeded generator costs ~8 us
    state["state"]["state"] = (high << 64) | low
    bits.state = state
    return bits.random_raw((count + 1) // 2).view(np.uint32)[:count]
