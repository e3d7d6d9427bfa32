"""Adapted projections that read the same input share one dropout mask and one `x A^T` matmul.

In a transformer block q_proj, k_proj and v_proj all read the normed hidden states, and so do
gate_proj and up_proj. Computed one by one, each LoRA layer draws its own dropout mask over that
input, keeps its own masked copy for the backward pass and runs a thin `(tokens x in) @ (in x r)`
matmul that is bound by reading the input, not by arithmetic. As a group they do it once:

    h = dropout(x) [A_q; A_k; A_v]^T        one mask, one copy, one matmul of width 3r
    q = W_q x + s B_q h[:, 0:r]   k = W_k x + s B_k h[:, r:2r]   v = ...

and the backward pass gets one `h`-gradient matmul for A and one for x instead of three each. The
result is the same function as the layers computed alone (tests/lora/test_shared_input.py checks
outputs and gradients against the plain path). With dropout on, the group's members see the same
mask, as they do in PEFT on a model with a fused qkv_proj; each member's output has the same
distribution as with its own mask.

The parameters stay per layer (A_q, A_k, A_v are separate tensors, concatenated at each call), so
files, optimizer state and `named_parameters` are unchanged: the grouping is an execution detail.

Whichever member is called first computes the group's `h` for its input and keeps it until every
member has taken its slice; in training, where the group runs as one autograd node (`lora/fused.py`),
it computes and keeps every member's whole output instead. A member called with a different input (or after the input or an A
was modified in place, or with grad mode or train/eval mode changed) triggers a fresh computation,
so a model that does not feed the members the same tensor still gets the right answer, only
without the saving. Sharded setups that gather parameters per module (DeepSpeed ZeRO-3) must not
group: a member reads its siblings' A; `share_inputs(model, False)` turns grouping off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.lora import fused

# Sibling module names that read the same input in the architectures transformers ships.
SHARED_INPUT_NAMES = (
    ("q_proj", "k_proj", "v_proj"),   # Llama, Mistral, Qwen, Gemma, Phi-3 (unfused), ...
    ("gate_proj", "up_proj"),         # SwiGLU MLPs
    ("query", "key", "value"),        # BERT-style attention
    ("w1", "w3"),                     # Mixtral experts
)


class SharedInputGroup:
    """The members' low-rank inputs `(x * mask) A_i^T` (or, fused, their outputs) computed together for one input `x`."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self._held: torch.Tensor | None = None  # the input the results below were computed for
        self._key: tuple | None = None
        self._results: list[torch.Tensor] | tuple[torch.Tensor, ...] = []
        self._untaken: set[int] = set()  # indices of the members that have not yet taken their result

    def fusable(self, x: torch.Tensor) -> bool:
        return all(fused.fusable(member, x) for member in self.members)

    def _key_for(self, x: torch.Tensor, layer: nn.Module, fuse: bool) -> tuple:
        tensors = [member.lora_A.weight for member in self.members]
        if fuse:  # the outputs also depend on B and the base weights
            tensors += [t for m in self.members for t in (m.lora_B.weight, m.base_layer.weight)]
        return (_version(x), tuple(_version(t) for t in tensors), torch.is_grad_enabled(), layer.training,
                torch.is_autocast_enabled(x.device.type), fuse)

    def low_rank_input(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The calling member's `(x * mask) A^T` (the plain path)."""
        return self._take(layer, x, fuse=False)

    def output(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The calling member's whole output, from one `FusedLora` node for the group (when `fusable`)."""
        return self._take(layer, x, fuse=True)

    def _take(self, layer: nn.Module, x: torch.Tensor, fuse: bool) -> torch.Tensor:
        key = self._key_for(x, layer, fuse)
        index = next(i for i, member in enumerate(self.members) if member is layer)
        # a member called again before its siblings (or with another input) gets a fresh result, never
        # one it already has (a caller may modify its output in place)
        if index not in self._untaken or self._held is not x or key != self._key:
            self._results = (fused.fused_outputs(self.members, x, layer.lora_dropout) if fuse
                             else self._low_rank_inputs(x, layer))
            self._key, self._held, self._untaken = key, x, set(range(len(self.members)))
        result = self._results[index]
        self._untaken.discard(index)
        if not self._untaken:  # every member has its result: drop the references
            self._key, self._results, self._held = None, [], None
        return result

    def _low_rank_inputs(self, x: torch.Tensor, layer: nn.Module) -> list[torch.Tensor]:
        dtype = layer.compute_dtype(x)
        a = torch.cat([member.lora_A.weight for member in self.members]).to(dtype)
        # masked as the calling layer's mode says (members in the other mode recompute: the key
        # holds it), before dropout's 1 / (1 - p), as the plain path
        h = F.linear(layer.lora_dropout.masked(x).to(dtype), a)
        return list(h.split([member.r for member in self.members], dim=-1))


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place modification counter; inference-mode tensors have none (and cannot be modified in place)."""
    return None if tensor.is_inference() else tensor._version


def _groupable(members: list[nn.Module]) -> bool:
    first = members[0]
    return all(
        m.in_features == first.in_features and m.lora_dropout.p == first.lora_dropout.p
        and m.lora_A.weight.dtype == first.lora_A.weight.dtype and m.lora_A.weight.device == first.lora_A.weight.device
        for m in members
    )


def share_inputs(model: nn.Module, enabled: bool = True) -> int:
    """Group the LoRA layers of `model` that read the same input (or ungroup them); returns the group count."""
    from lorafit.lora.layer import LoraLinear

    groups = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SHARED_INPUT_NAMES:
            members = [children[n] for n in names if isinstance(children.get(n), LoraLinear)]
            for member in members:
                member.shared_input = None
            if enabled and len(members) > 1 and _groupable(members):
                group = SharedInputGroup(members)
                for member in members:
                    member.shared_input = group
                groups += 1
    return groups
