"""oneDNN linear layers (the CPU inference fast path) against plain `nn.Linear`."""

from __future__ import annotations

import pytest
import torch

from lorafit.infer.cpu_linear import OneDNNLinear, onednn_linear_available, use_onednn_linear
from lorafit.infer.generate import generate
from lorafit.infer.options import GenerationOptions

from model_builders import build_tiny_llama

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN linear")


def test_same_logits_and_greedy_answers_as_plain_linear_layers():
    plain, fast = build_tiny_llama(), build_tiny_llama()
    assert use_onednn_linear(fast) == 2 * 7 + 1  # q k v o gate up down per layer, and the output head
    ids = torch.tensor([[5, 17, 42, 9, 3, 77, 21, 8, 1, 60]])
    with torch.inference_mode():
        assert torch.allclose(fast(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    prompts = [[5, 17, 42, 9, 3, 77, 21], [8, 1, 60], [100, 2, 33, 4, 90]]
    options = GenerationOptions(temperature=0, max_new_tokens=16)
    assert [c.token_ids for c in generate(fast, prompts, options)] == \
           [c.token_ids for c in generate(plain, prompts, options)]


def test_gradients_still_flow_and_other_dtypes_are_left_alone():
    layer = torch.nn.Linear(4, 3)
    use_onednn_linear(layer)
    assert type(layer) is OneDNNLinear
    x = torch.randn(2, 4, requires_grad=True)
    layer(x).sum().backward()  # falls back to F.linear under autograd
    assert x.grad is not None and layer.weight.grad is not None
    bf16 = torch.nn.Linear(4, 3).to(torch.bfloat16)
    assert use_onednn_linear(bf16) == 0 and type(bf16) is torch.nn.Linear
