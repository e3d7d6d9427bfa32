"""The trained-positions-only, chunked loss against the model's own loss: same value, same gradients."""

import pytest
import torch

import lorafit
from lorafit.train.trained_token_loss import CHUNK_ELEMENTS, supports, trained_token_loss, use_trained_token_loss
from model_builders import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2


def batch():
    ids = torch.randint(0, 128, (3, 13), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100  # prompts
    labels[1, 9:] = -100  # padding
    return ids, labels


def loss_and_grads(builder, fast: bool, num_items=None, **lora):
    model = builder()
    lorafit.add_lora(model, lorafit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                               lora_dropout=0.0, **lora))
    if fast:
        assert use_trained_token_loss(model)
    model.train()
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels, num_items_in_batch=num_items)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, torch.tensor(40)])
@pytest.mark.parametrize("builder,lora", [
    (build_tiny_llama, {}),
    (build_tiny_qwen2, {}),  # tied head: the frozen embedding is the head
    (build_tiny_gpt2, {}),
    (build_tiny_llama, {"modules_to_save": ["lm_head"]}),  # a trained head gets its gradient
])
def test_same_loss_and_gradients_as_the_model_own(builder, lora, num_items):
    reference, reference_grads = loss_and_grads(builder, fast=False, num_items=num_items, **lora)
    fast, fast_grads = loss_and_grads(builder, fast=True, num_items=num_items, **lora)
    assert fast.logits is None  # nothing of [tokens x vocab] is returned either
    assert abs(fast.loss.item() - reference.loss.item()) <= 1e-5
    assert fast_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        assert ((fast_grads[name] - grad).norm() / grad.norm()).item() <= 1e-5, name


def test_chunks_do_not_change_the_result():
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    results = []
    for chunk_elements in (CHUNK_ELEMENTS, 50, 150):  # one chunk, one row per chunk, three rows
        loss = trained_token_loss(hidden, labels, weight, chunk_elements=chunk_elements)
        grads = torch.autograd.grad(loss * 3.0, (hidden, weight))  # the upstream scale reaches both
        results.append((loss, *grads))
    logits = hidden[:, :-1] @ weight.T
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1))
    expected_grads = torch.autograd.grad(expected * 3.0, (hidden, weight))
    for loss, grad_hidden, grad_weight in results:
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad_hidden, expected_grads[0])
        torch.testing.assert_close(grad_weight, expected_grads[1])


def test_soft_targets_are_the_cross_entropy_to_their_weights():
    """Rows with soft targets (replay distillation) against the plain formula, sum_v w(v) * (-log q(v))
    for a row of weights w (a row whose weights sum to s counts s times), hard rows unchanged, in
    any chunking."""
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    trained = labels[:, 1:] != -100
    count = int(trained.sum())
    token_ids = torch.stack([torch.randperm(50)[:3] for _ in range(count)])
    weights = torch.rand(count, 3, dtype=torch.float64) * 1.5  # sums of 0 to 4.5
    weights[::2] = 0  # every other trained position keeps its label
    weights[1, 2] = 0  # a zero weight among the kept tokens

    targets = torch.zeros(count, 50, dtype=torch.float64).scatter_(1, token_ids, weights)
    hard = weights.sum(-1) == 0
    targets[hard] = torch.nn.functional.one_hot(labels[:, 1:][trained][hard], 50).double()
    log_q = torch.log_softmax(hidden[:, :-1][trained] @ weight.T, dim=-1)
    expected = -(targets * log_q).sum() / count
    expected_grads = torch.autograd.grad(expected * 2.0, (hidden, weight))
    for chunk_elements in (CHUNK_ELEMENTS, 50, 150):
        loss = trained_token_loss(hidden, labels, weight, chunk_elements=chunk_elements,
                                  soft_targets=(token_ids, weights))
        grads = torch.autograd.grad(loss * 2.0, (hidden, weight))
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grads[0], expected_grads[0])
        torch.testing.assert_close(grads[1], expected_grads[1])


def test_soft_targets_must_cover_every_trained_position():
    hidden, weight = torch.randn(1, 5, 8), torch.randn(20, 8)
    labels = torch.tensor([[-100, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match="soft targets for 3 positions, but the batch trains 4"):
        trained_token_loss(hidden, labels, weight, soft_targets=(torch.zeros(3, 2, dtype=torch.long),
                                                                 torch.zeros(3, 2)))


def test_evaluation_and_generation_are_unchanged(tiny_llama):
    ids, labels = batch()
    with torch.no_grad():
        expected = tiny_llama(input_ids=ids, labels=labels)
        assert use_trained_token_loss(tiny_llama)
        got = tiny_llama(input_ids=ids, labels=labels)  # eval: no gradient work, same loss
        logits = tiny_llama(input_ids=ids).logits  # no labels: the model's own forward
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-6
    torch.testing.assert_close(logits, expected.logits)


def test_heads_it_cannot_reproduce_keep_their_own_loss(tiny_llama):
    tiny_llama.config.final_logit_softcapping = 30.0  # Gemma-2 style: not a plain linear head
    assert not supports(tiny_llama) and not use_trained_token_loss(tiny_llama)
    model = build_tiny_llama()
    lorafit.add_lora(model, lorafit.LoraConfig(target_modules=["lm_head"]))  # a LoRA-adapted head
    assert not supports(model)
