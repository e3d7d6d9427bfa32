"""The fused training node (lora/fused.py) against the plain path, and where it must step aside."""

import copy

import pytest
import torch

import lorafit
from lorafit.lora import LoraLinear, lora_layers, share_inputs, use_fused
from lorafit.lora import fused
from model_builders import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2
from test_shared_input import relative_error


def loss_and_grads(model, fused_on: bool, seed: int = 5):
    use_fused(model, fused_on)
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)  # the same dropout masks on both paths
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def adapted(builder, dtype=torch.float32, dropout=0.0, **lora):
    model = builder().to(dtype)
    config = lorafit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout, **lora)
    return lorafit.add_lora(model, config)


def calls_of_fused_node(model) -> list[int]:
    """How many FusedLora nodes one forward pass builds (0: every layer took the plain path)."""
    counted = []
    original = fused.FusedLora.apply

    def counting(*args):
        counted.append(1)
        return original(*args)

    fused.FusedLora.apply = counting
    try:
        ids = torch.randint(0, 128, (1, 5))
        model(ids, labels=ids).loss.backward()
    finally:
        fused.FusedLora.apply = original
    return counted


# The same sums in another order (the input's gradient accumulated by the GEMMs instead of added
# up by autograd): float64 shows the maths is the same; float32 and bfloat16 differ by rounding.
TOLERANCE = [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 5e-2)]


@pytest.mark.parametrize("dtype,tolerance", TOLERANCE)
@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_equals_plain_loss_and_gradients(builder, dtype, tolerance, dropout):
    model = adapted(builder, dtype, dropout).train()
    fused_loss, fused_grads = loss_and_grads(model, True)
    plain_loss, plain_grads = loss_and_grads(model, False)
    assert relative_error(fused_loss, plain_loss) <= tolerance
    if dtype == torch.float32:
        assert abs(fused_loss - plain_loss) <= 1e-5
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        assert relative_error(fused_grads[name], plain_grads[name]) <= tolerance, name


def test_fused_runs_for_every_adapted_linear_layer_of_a_llama():
    model = adapted(build_tiny_llama).train()
    layers = len(model.model.layers)
    assert len(calls_of_fused_node(model)) == 4 * layers  # q/k/v, o, gate/up, down
    share_inputs(model, False)
    assert len(calls_of_fused_node(model)) == 7 * layers
    use_fused(model, False)
    assert calls_of_fused_node(model) == []


def test_fused_with_only_the_top_layers_adapted_and_gradient_checkpointing():
    """The lowest adapted block's input needs no gradient; checkpointing replays the forward with
    the same dropout masks."""
    model = adapted(build_tiny_llama, dropout=0.2, layers_to_transform=[1]).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    fused_loss, fused_grads = loss_and_grads(model, True)
    plain_loss, plain_grads = loss_and_grads(model, False)
    assert abs(fused_loss - plain_loss) <= 1e-5
    for name in plain_grads:
        assert relative_error(fused_grads[name], plain_grads[name]) <= 1e-5, name


def test_fused_group_with_an_unused_member_and_biases():
    torch.manual_seed(0)
    parent = torch.nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = (
        LoraLinear(torch.nn.Linear(8, out).requires_grad_(False), r=2, lora_alpha=4, init_lora_weights=False)
        for out in (6, 4, 4))
    share_inputs(parent)
    reference = copy.deepcopy(parent)
    use_fused(reference, False)
    results = []
    for module in (parent, reference):
        x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
        q, k, _ = module.q_proj(x), module.k_proj(x), module.v_proj(x)  # v's output is never used
        (q.square().sum() + k.sum()).backward()
        results.append((q, x.grad, {n: p.grad for n, p in module.named_parameters() if p.requires_grad}))
    (q, x_grad, grads), (q_ref, x_grad_ref, grads_ref) = results
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(x_grad, x_grad_ref)
    assert grads["v_proj.lora_B.weight"] is None and grads_ref["v_proj.lora_B.weight"] is None
    for name, grad in grads_ref.items():
        if grad is not None:
            torch.testing.assert_close(grads[name], grad, msg=name)


def test_fused_keeps_the_input_and_the_dropped_positions_not_a_masked_copy():
    layer = LoraLinear(torch.nn.Linear(64, 16, bias=False).requires_grad_(False), r=4, lora_alpha=8,
                       lora_dropout=0.2).train()
    x = torch.randn(50, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    full_size = [t for t in saved if t.numel() == x.numel()]
    assert len(full_size) == 1 and full_size[0].data_ptr() == x.data_ptr()  # x itself, no copy
    positions = [t for t in saved if t.dtype == torch.int64]
    assert len(positions) == 1 and 0.1 * x.numel() < positions[0].numel() < 0.3 * x.numel()


def test_fused_dropout_leaves_its_input_unchanged_for_other_readers():
    """The node zeroes the dropped elements of x in place around its thin matmuls: afterwards x holds
    its own values, its version counter has not moved, and another node that saved x (here `x * w`)
    gets the same gradients as on the plain path."""
    layer = LoraLinear(torch.nn.Linear(32, 16, bias=False).requires_grad_(False), r=4, lora_alpha=8,
                       lora_dropout=0.3, init_lora_weights=False).train()
    w = torch.randn(32, requires_grad=True)
    source = torch.randn(3, 7, 32)
    results = {}
    for fused_on in (True, False):
        use_fused(layer, fused_on)
        x = source.clone().requires_grad_(True)
        before, version = x.detach().clone(), x._version
        torch.manual_seed(4)
        loss = layer(x).square().sum() + (x * w).square().sum()
        assert torch.equal(x.detach(), before) and x._version == version
        loss.backward()
        assert torch.equal(x.detach(), before) and x._version == version
        results[fused_on] = (loss.detach(), x.grad, w.grad.clone(), layer.lora_A.weight.grad.clone())
        w.grad = None
        layer.zero_grad(set_to_none=True)
    for fused_value, plain_value in zip(results[True], results[False]):
        torch.testing.assert_close(fused_value, plain_value, rtol=1e-5, atol=1e-5)


def test_fused_dropout_on_a_non_contiguous_input():
    layer = LoraLinear(torch.nn.Linear(8, 6, bias=False).requires_grad_(False), r=2, lora_alpha=4,
                       lora_dropout=0.4, init_lora_weights=False).train()
    source = torch.randn(8, 5, requires_grad=True)
    grads = {}
    for fused_on in (True, False):
        use_fused(layer, fused_on)
        source.grad = None
        torch.manual_seed(2)
        out = layer(source.t())  # [5 x 8], not contiguous
        out.square().sum().backward()
        grads[fused_on] = (out.detach(), source.grad.clone())
    torch.testing.assert_close(grads[True], grads[False])


@pytest.mark.parametrize("case", ["no_grad", "hook", "trained_base", "autocast", "merged", "dora", "conv1d"])
def test_fused_steps_aside_where_it_would_not_be_the_same_function(case):
    builder = build_tiny_gpt2 if case == "conv1d" else build_tiny_llama
    model = adapted(builder, use_dora=case == "dora").train()
    layer = next(layer for _, layer in lora_layers(model))
    x = torch.randn(2, 3, layer.in_features)
    if case == "no_grad":
        with torch.no_grad():
            assert not fused.fusable(layer, x)
        return
    if case == "hook":
        layer.base_layer.register_forward_pre_hook(lambda module, args: None)
    if case == "trained_base":
        layer.base_layer.weight.requires_grad_(True)
    if case == "merged":
        layer.merge()
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused.fusable(layer, x)
        return
    assert not fused.fusable(layer, x)
    ids = torch.randint(0, 128, (1, 5))
    model(ids, labels=ids).loss.backward()  # and the plain path still trains


def test_fused_applies_in_the_common_case():
    model = adapted(build_tiny_llama).train()
    layer = next(layer for _, layer in lora_layers(model))
    assert fused.fusable(layer, torch.randn(2, 3, layer.in_features))


def test_a_compiled_model_trains_with_dropout():
    """torch.compile (the Trainer's --torch_compile) traces the node and draws dropout masks with
    torch's own generator (numpy's, and the 64- to 16-bit view, do not trace)."""
    model = adapted(build_tiny_llama, dropout=0.1).train()
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(0, 128, (2, 11))
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_a_bf16_base_under_bf16_autocast_is_fused_and_equals_plain():
    """The Trainer's --bf16: base weights in bfloat16, the forward under autocast to bfloat16."""
    model = adapted(build_tiny_llama, torch.bfloat16, dropout=0.1).train()
    layer = next(layer for _, layer in lora_layers(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.fusable(layer, torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16))
        fused_loss, fused_grads = loss_and_grads(model, True)
        plain_loss, plain_grads = loss_and_grads(model, False)
    assert relative_error(fused_loss, plain_loss) <= 5e-2
    for name in plain_grads:
        assert relative_error(fused_grads[name], plain_grads[name]) <= 5e-2, name


def test_a_member_called_twice_gets_a_fresh_output_it_may_modify_in_place():
    parent = torch.nn.Module()
    parent.gate_proj, parent.up_proj = (
        LoraLinear(torch.nn.Linear(8, 6, bias=False).requires_grad_(False), r=2, lora_alpha=4, init_lora_weights=False)
        for _ in range(2))
    share_inputs(parent)
    x = torch.randn(4, 8, requires_grad=True)
    first = parent.gate_proj(x)
    expected = first.detach().clone()
    first.mul_(0)  # the caller owns its output
    second = parent.gate_proj(x)
    assert second is not first
    torch.testing.assert_close(second.detach(), expected)
    torch.testing.assert_close(parent.up_proj(x).detach(),
                               parent.up_proj.base_layer(x).detach() + 2 * (x @ parent.up_proj.lora_A.weight.T
                                                                             @ parent.up_proj.lora_B.weight.T).detach())
