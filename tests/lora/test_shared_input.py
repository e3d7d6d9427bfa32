"""The fast LoRA path (shared-input groups, addmm, folded scales) against the plain one."""

import pytest
import torch

import lorafit
from lorafit.lora import LoraLinear, lora_layers, share_inputs
from model_builders import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2


def loss_and_grads(builder, grouped: bool, dropout: float = 0.0, train: bool = False, dtype=torch.float32, **lora):
    model = builder().to(dtype)
    config = lorafit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout, **lora)
    lorafit.add_lora(model, config)
    share_inputs(model, grouped)
    model.train(train)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


# The same sums in another order (one wide matmul instead of three, addmm instead of add): float64
# shows the maths is the same (relative error ~1e-15); float32 differs by rounding only, ~1e-6 of a
# gradient's norm on these random models (held to 1e-5, loss within 1e-5); bfloat16 (8-bit mantissa,
# rounding at every op) within 5e-2.
TOLERANCE = [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 5e-2)]


@pytest.mark.parametrize("dtype,tolerance", TOLERANCE)
@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_qwen2, build_tiny_gpt2])
def test_grouped_equals_plain_loss_and_gradients(builder, dtype, tolerance):
    grouped_loss, grouped = loss_and_grads(builder, grouped=True, dtype=dtype)
    plain_loss, plain = loss_and_grads(builder, grouped=False, dtype=dtype)
    assert relative_error(grouped_loss, plain_loss) <= tolerance
    if dtype == torch.float32:
        assert abs(grouped_loss - plain_loss) <= 1e-5
    assert grouped.keys() == plain.keys()
    for name in plain:
        assert relative_error(grouped[name], plain[name]) <= tolerance, name


def test_grouped_equals_plain_in_eval_with_dropout_configured():
    grouped_loss, grouped = loss_and_grads(build_tiny_llama, grouped=True, dropout=0.3)
    plain_loss, plain = loss_and_grads(build_tiny_llama, grouped=False, dropout=0.3)
    assert abs(grouped_loss - plain_loss) <= 1e-5
    for name in plain:
        assert relative_error(grouped[name], plain[name]) <= 1e-5, name


def test_groups_are_the_projections_that_read_the_same_input(tiny_llama):
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(target_modules="all-linear"))
    attention, mlp = tiny_llama.model.layers[0].self_attn, tiny_llama.model.layers[0].mlp
    assert attention.q_proj.shared_input is attention.k_proj.shared_input is attention.v_proj.shared_input
    assert attention.q_proj.shared_input.members == [attention.q_proj, attention.k_proj, attention.v_proj]
    assert mlp.gate_proj.shared_input is mlp.up_proj.shared_input is not None
    assert attention.o_proj.shared_input is None and mlp.down_proj.shared_input is None
    assert share_inputs(tiny_llama, False) == 0
    assert all(layer.shared_input is None for _, layer in lora_layers(tiny_llama))


def test_a_member_called_with_another_input_gets_its_own_answer():
    layers = [LoraLinear(torch.nn.Linear(8, 6), r=2, lora_alpha=4, init_lora_weights=False) for _ in range(3)]
    parent = torch.nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = layers
    assert share_inputs(parent) == 1
    x, other = torch.randn(5, 8), torch.randn(5, 8)
    expected = [layer.base_layer(inp) + 2 * inp @ layer.lora_A.weight.T @ layer.lora_B.weight.T
                for layer, inp in zip(layers, (x, other, x))]
    got = [parent.q_proj(x), parent.k_proj(other), parent.v_proj(x)]
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference)
    # an in-place change of A between members' calls is seen, never a stale cached product
    parent.q_proj(x)
    with torch.no_grad():
        parent.k_proj.lora_A.weight.add_(1.0)
    reference = layers[1].base_layer(x) + 2 * x @ layers[1].lora_A.weight.T @ layers[1].lora_B.weight.T
    torch.testing.assert_close(parent.k_proj(x), reference)


def test_grouped_training_with_dropout_shares_one_mask():
    parent = torch.nn.Module()
    parent.gate_proj, parent.up_proj = (LoraLinear(torch.nn.Linear(64, 64), r=4, lora_alpha=4, lora_dropout=0.5,
                                                   init_lora_weights=False) for _ in range(2))
    for layer in (parent.gate_proj, parent.up_proj):  # make both A equal: equal h means equal masks
        layer.lora_A.weight.data.copy_(parent.gate_proj.lora_A.weight.data)
    share_inputs(parent)
    parent.train()
    x = torch.randn(3, 64)
    h_gate = parent.gate_proj.shared_input.low_rank_input(parent.gate_proj, x)
    h_up = parent.up_proj.shared_input.low_rank_input(parent.up_proj, x)
    torch.testing.assert_close(h_gate, h_up)


def test_grouped_path_matches_real_peft(tiny_llama):
    peft = pytest.importorskip("peft")
    import copy

    ids = torch.randint(0, 128, (2, 9))
    reference = peft.get_peft_model(copy.deepcopy(tiny_llama), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.1))
    ours = lorafit.add_lora(tiny_llama, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          lora_dropout=0.1))
    ours_params = dict(ours.named_parameters())
    for name, param in reference.named_parameters():
        if "lora_" in name:
            ours_params[name.replace("base_model.model.", "").replace(".default", "")].data.copy_(param.data)
    reference.eval(), ours.eval()
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_grouped_layers_run_under_inference_mode(tiny_llama):
    ids = torch.randint(0, 128, (2, 7))
    lorafit.add_lora(tiny_llama, lorafit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        expected = tiny_llama(ids).logits
    with torch.inference_mode():
        torch.testing.assert_close(tiny_llama(ids).logits, expected)
