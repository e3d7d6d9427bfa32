"""One autograd node for an adapted layer, or for a group of layers that read the same input.

Written with autograd's building blocks, an adapted linear layer is a small graph: the frozen
matmul, the dropout mask, the two thin matmuls, the add. Its backward pass then builds the input's
gradient from parts that autograd sums one pair at a time in fresh buffers: `g W` from the frozen
path, `mask * (g_h A)` from the low-rank one, and for q/k/v three of each (`InputBuffer` adds, a
`where` with its own output, a `cat` of the slices' gradients). Each is a full pass over a
`[tokens x in]` tensor; together they are a good part of what LoRA adds to a frozen model's step.

Here the members' forward and backward are written out once, for n >= 1 layers that read the same
input x (q/k/v, gate/up, or one layer alone):

    forward     h = (x * keep) [A_1; ...; A_n]^T                 one mask, one thin matmul
                y_i = W_i x + b_i;  y_i += s_i h_i B_i^T          the update added in place
    backward    g_h = [s_1 g_1 B_1, ..., s_n g_n B_n]            thin
                dB_i = s_i g_i^T h_i;  dA = g_h^T (x * keep)      thin
                dx = (g_h A) * keep, then += g_i W_i for each i   one buffer, written by the GEMMs

so the input's gradient is one buffer that each frozen GEMM accumulates into (beta = 1), masked in
place, with no add or `where` pass of its own. It is the same function as the plain path (layer.py
`LoraLinear.forward`; tests/lora/test_fused.py checks outputs and gradients against it, with
dropout on, given the same random state).

`x * keep` is never built: dropout comes as the positions of the dropped elements (~5% of them at
p = 0.05, `lora/dropout.py`), and the two thin matmuls that read the masked input run on x itself
with those elements set to zero for the call and put back right after (`_dropped_zeroed`). That
saves a full-size copy of the input per layer (allocated, written, kept for the backward pass and
read again) for three passes over the dropped elements only. The writes go through `x.data`, which
autograd does not version: x holds its own values again before anything else runs (the forward and
backward of one node are not interleaved with other work on its input), so other nodes that saved x
see it unchanged.

Used only where it is exactly that function: training with gradients on, the base a plain
`nn.Linear` with frozen weights and no hooks of its own (a quantized base, DeepSpeed ZeRO-3's
parameter gathering and accelerate's device hooks work through the module's forward, so they keep
the plain path), no DoRA, not merged, the input in the base weight's dtype (and in autocast's,
under autocast: a bf16 base under `--bf16`), not under torch.compile (which fuses the plain path's
operators itself). Anything else takes the plain path; `use_fused(model, False)` turns it off for
a whole model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FusedPlan:
    """What the node needs besides its differentiable inputs (x, A_1..A_n, B_1..B_n)."""

    weights: tuple[torch.Tensor, ...]  # frozen W_i, [out_i x in]
    biases: tuple[torch.Tensor | None, ...]
    scales: tuple[float, ...]  # s_i = alpha_i / r_i, times dropout's 1 / (1 - p) when it is on
    ranks: tuple[int, ...]


class FusedLora(torch.autograd.Function):
    """`(plan, dropped, x, A_1..A_n, B_1..B_n) -> (y_1..y_n)`; A and B already in x's dtype.

    `dropped` are dropout's positions in x as a contiguous `[tokens x in]` (flat int64 indices of the
    elements to zero; None: no dropout).
    """

    @staticmethod
    def forward(ctx, plan: FusedPlan, dropped: torch.Tensor | None, x: torch.Tensor, *lora: torch.Tensor):
        n = len(plan.weights)
        a_list, b_list = lora[:n], lora[n:]
        flat = x.reshape(-1, x.shape[-1])
        if dropped is not None and not flat.is_contiguous():
            flat = flat.contiguous()  # a buffer of our own, in the layout the positions index
        a = torch.cat(a_list) if n > 1 else a_list[0]
        with _dropped_zeroed(flat, dropped):
            h = torch.mm(flat, a.t())
        outputs, start = [], 0
        for weight, bias, scale, rank, b in zip(plan.weights, plan.biases, plan.scales, plan.ranks, b_list):
            # written through a flat view into a tensor of the output's shape: an output that is
            # itself a view could not be modified in place by the caller
            y = x.new_empty(*x.shape[:-1], weight.shape[0])
            flat_y = y.view(-1, weight.shape[0])
            if bias is None:
                torch.mm(flat, weight.t(), out=flat_y)
            else:
                torch.addmm(bias, flat, weight.t(), out=flat_y)
            flat_y.addmm_(h[:, start:start + rank], b.t(), alpha=scale)
            outputs.append(y)
            start += rank
        ctx.plan, ctx.x_shape = plan, x.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, its B's too (as plain autograd)
        # activations through save_for_backward (so saved-tensor hooks, e.g. CPU offloading, see
        # them): the input (as [tokens x in]), the dropped positions, h
        ctx.save_for_backward(flat, dropped, h, a, *b_list)
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        plan = ctx.plan
        flat, dropped, h, a, *b_list = ctx.saved_tensors
        n, tokens = len(plan.weights), h.shape[0]
        flat_grads = [None if g is None else g.reshape(tokens, g.shape[-1]) for g in grads]
        grad_h_parts, grad_b = [], []
        start = 0
        for g, b, scale, rank in zip(flat_grads, b_list, plan.scales, plan.ranks):
            h_i = h[:, start:start + rank]
            start += rank
            if g is None:  # this output was not used: no gradient through it
                grad_h_parts.append(h_i.new_zeros(tokens, rank))
                grad_b.append(None)
                continue
            grad_h_parts.append(torch.mm(g, b).mul_(scale))
            grad_b.append(torch.mm(g.t(), h_i).mul_(scale))
        grad_h = torch.cat(grad_h_parts, dim=1) if n > 1 else grad_h_parts[0]

        grad_x = None
        if ctx.needs_input_grad[2]:
            grad_x = torch.mm(grad_h, a)
            if dropped is not None:
                _zero_at(grad_x.view(-1), dropped)
            for g, weight in zip(flat_grads, plan.weights):
                if g is not None:
                    grad_x.addmm_(g, weight)
            grad_x = grad_x.view(ctx.x_shape)
        grad_a = [None] * n
        needs = ctx.needs_input_grad[3:]  # A_1..A_n, B_1..B_n
        if any(needs[:n]):
            with _dropped_zeroed(flat, dropped):
                grad_a = list(torch.mm(grad_h.t(), flat).split(list(plan.ranks)))
        grad_a = [g if need else None for g, need in zip(grad_a, needs[:n])]
        grad_b = [g if need else None for g, need in zip(grad_b, needs[n:])]
        return (None, None, grad_x, *grad_a, *grad_b)


@contextmanager
def _dropped_zeroed(flat: torch.Tensor, dropped: torch.Tensor | None):
    """`flat` (contiguous) reads as `x * keep` inside the block and as x again after it."""
    if dropped is None:
        yield
        return
    values = flat.data.view(-1)  # .data: the writes below are not versioned (see the module doc)
    kept_aside = values.take(dropped)
    _zero_at(values, dropped)
    try:
        yield
    finally:
        values.put_(dropped, kept_aside)


def _zero_at(values: torch.Tensor, positions: torch.Tensor) -> None:
    """Zero the 1-d `values` at `positions`, in place: `put_` from an expanded 0-d zero (with `take`,
    the fastest of torch's scattered writes and reads on a CPU: about half the time of `index_fill_`
    / `index_copy_` at ~15k positions)."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values.put_(positions, zero.expand(len(positions)))


def fusable(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` (a LoraLinear) may run through `FusedLora` for input `x` now."""
    base = layer.base_layer
    return (
        layer.fused and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        and not layer.merged and layer.lora_magnitude_vector is None
        and type(base) is nn.Linear and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and not (base._forward_hooks or base._forward_pre_hooks)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
        and x.dim() >= 2 and x.dtype == base.weight.dtype and x.device == base.weight.device
        and (not torch.is_autocast_enabled(x.device.type) or torch.get_autocast_dtype(x.device.type) == x.dtype)
    )


def fused_outputs(members: list[nn.Module], x: torch.Tensor, dropout: nn.Module) -> tuple[torch.Tensor, ...]:
    """Every member's output for input x, through one `FusedLora` node (members all `fusable`), with
    `dropout` (the calling member's: members of a group share p) drawing the one mask."""
    dropped = dropout.dropped_positions(x) if dropout.active else None
    keep_scale = dropout.keep_scale if dropout.active else 1.0
    plan = FusedPlan(
        weights=tuple(m.base_layer.weight for m in members),
        biases=tuple(m.base_layer.bias for m in members),
        scales=tuple(m.scaling * keep_scale for m in members),
        ranks=tuple(m.r for m in members),
    )
    a_list = [m.lora_A.weight.to(x.dtype) for m in members]
    b_list = [m.lora_B.weight.to(x.dtype) for m in members]
    return FusedLora.apply(plan, dropped, x, *a_list, *b_list)


def use_fused(model: nn.Module, enabled: bool = True) -> int:
    """Let the LoRA layers of `model` use the fused node where they can (or keep them on the plain path)."""
    from lorafit.lora.layer import LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.fused = enabled
    return len(layers)
