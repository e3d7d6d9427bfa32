"""--replay_token_penalty: the task data's signature tokens, kept below the base model's K-th token at
replay positions; the loss and its gradient against the formula written out on full logits with
autograd, and zero where the adapted model is still the base model."""

from __future__ import annotations

import json

import pytest
import torch

from lorafit.train.replay_token_penalty import TokenPenalty, signature_tokens
from lorafit.train.run import main as train_main
from lorafit.train.trained_token_loss import trained_token_loss


def test_signature_tokens_are_frequent_in_the_task_answers_and_rare_in_the_replay():
    task = [[-100, -100, 5, 6, 7], [-100, 5, 6, 9], [-100, 5, 8, 7], [-100, 9, 9]]
    replay = [[-100, 7, 9, 1], [-100, 7, 2]] + [[-100, 3, 4]] * 98  # 7 in 2% of the replay rows, 9 in 1%
    # 5: 3/4 of the task rows, no replay row; 6: 2/4; 7: 2/4 and 2% of the replay (the limit);
    # 8: 1/4 of the task rows (under 30%); 9: 2/4 but in 1% of the replay; -100 is never a token
    assert signature_tokens(task, replay, task_share=0.3, replay_share=0.02) == [5, 6, 7, 9]
    assert signature_tokens(task, replay, task_share=0.3, replay_share=0.01) == [5, 6, 9]
    assert signature_tokens(task, replay, task_share=0.6, replay_share=0.02) == [5]
    assert signature_tokens([], replay) == []


def reference(hidden, labels, head, ids, weights, penalty):
    """The same loss on full logits: cross-entropy to the soft targets (labels where a row has none),
    plus weight * max(0, log q(t) - log p_K) at soft rows for tokens not among their targets, p_K the
    row's smallest positive target weight over the row's total."""
    logq = (hidden @ head.T).log_softmax(dim=-1)
    total = torch.zeros((), dtype=hidden.dtype)
    for row in range(logq.shape[0]):
        soft = bool((weights[row] != 0).any())
        if not soft:
            total = total - logq[row, labels[row]]
            continue
        total = total - (logq[row, ids[row]] * weights[row]).sum()
        held = set(ids[row][weights[row] > 0].tolist())
        floor = weights[row][weights[row] > 0].min() / weights[row].sum()
        for token in penalty.token_ids.tolist():
            if token not in held:
                total = total + penalty.weight * torch.relu(logq[row, token] - torch.log(floor))
    return total / logq.shape[0]


@pytest.mark.parametrize("chunk_elements", [1 << 20, 3 * 40])  # one chunk; chunks of 3 rows
def test_loss_and_gradients_equal_the_formula_on_full_logits(chunk_elements):
    torch.manual_seed(0)
    n, dim, vocab, k = 8, 6, 40, 3
    hidden = torch.randn(1, n + 1, dim, dtype=torch.float64, requires_grad=True)
    head = (2 * torch.randn(vocab, dim, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, n + 1))
    ids = torch.randint(0, vocab, (n, k))
    weights = torch.rand(n, k, dtype=torch.float64)
    weights[[0, 3]] = 0  # hard rows: their labels, no penalty
    ids[2, 0] = 11  # a signature token among a row's targets is left alone there
    weights[5, 1] = 0
    ids[5, 1] = 13  # ... but not where its target weight is 0
    penalty = TokenPenalty(torch.tensor([11, 13, 17, 23, 29, 31]), weight=2.5)
    loss = trained_token_loss(hidden, labels, head, soft_targets=(ids, weights), penalty=penalty,
                              chunk_elements=chunk_elements)
    grads = torch.autograd.grad(loss, (hidden, head))
    hidden2, head2 = hidden.detach().clone().requires_grad_(True), head.detach().clone().requires_grad_(True)
    expected = reference(hidden2[0, :n], labels[0, 1:], head2, ids, weights, penalty)
    expected_grads = torch.autograd.grad(expected, (hidden2, head2))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    without = trained_token_loss(hidden, labels, head, soft_targets=(ids, weights), chunk_elements=chunk_elements)
    assert loss.item() > without.item()  # the random head ranks some signature tokens above a row's K-th target


def test_zero_while_the_model_is_the_base_model():
    """Against the base model's own top-K targets every token outside them is below the K-th, so the
    penalty is zero (loss and gradients) until training moves a signature token past it."""
    torch.manual_seed(1)
    n, dim, vocab, k = 12, 6, 50, 4
    hidden = torch.randn(1, n + 1, dim, dtype=torch.float64, requires_grad=True)
    head = 3 * torch.randn(vocab, dim, dtype=torch.float64)
    labels = torch.randint(0, vocab, (1, n + 1))
    probs = (hidden[0, :n] @ head.T).softmax(dim=-1).detach()
    top, ids = probs.topk(k, dim=-1)
    weights = top / top.sum(dim=-1, keepdim=True)  # the base model's targets, as replay_targets makes them
    penalty = TokenPenalty(torch.arange(vocab), weight=5.0)  # every token a signature token
    plain = trained_token_loss(hidden, labels, head, soft_targets=(ids, weights))
    held = trained_token_loss(hidden, labels, head, soft_targets=(ids, weights), penalty=penalty)
    assert held.item() == plain.item()
    assert torch.equal(torch.autograd.grad(held, hidden)[0], torch.autograd.grad(plain, hidden)[0])
    moved = hidden.detach() + 0.5 * torch.randn_like(hidden)  # a trained model ranks tokens otherwise
    assert (trained_token_loss(moved, labels, head, soft_targets=(ids, weights), penalty=penalty).item()
            > trained_token_loss(moved, labels, head, soft_targets=(ids, weights)).item())


def test_a_run_with_the_penalty_names_its_tokens_and_trains(quick_args, finished_replay, tmp_path, caplog):
    caplog.set_level("INFO", logger="lorafit.train.replay_token_penalty")
    args = ["--replay_prompts", str(finished_replay), "--replay_distill_top_k", "8", "--seed", "3"]
    assert train_main(quick_args(tmp_path / "held", *args, "--replay_token_penalty", "1")) == 0
    assert "signature tokens of the task data:" in caplog.text
    assert "replay token penalty: the" in caplog.text and "signature tokens held below the base model's top K" in caplog.text
    assert "' I'" in caplog.text  # the identity set's first person, never in the replay's answers
    lines = (tmp_path / "held" / "metrics.jsonl").read_text().splitlines()
    losses = [record["loss"] for record in map(json.loads, lines) if "loss" in record]
    assert len(losses) == 4 and all(loss == loss for loss in losses)


@pytest.mark.parametrize("flags,message", [
    (["--replay_prompts", "builtin", "--replay_token_penalty", "1"], "--replay_token_penalty acts where the base"),
    (["--replay_prompts", "builtin", "--replay_distill_top_k", "8", "--replay_token_penalty", "-1"],
     "--replay_token_penalty must be 0 (off) or more"),
])
def test_penalty_flags_out_of_place_are_one_error(quick_args, tmp_path, capsys, flags, message):
    from lorafit.cli import main

    assert main(["train", *quick_args(tmp_path / "run", *flags)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_described_tokens_count_the_byte_pieces(smol_tokenizer):
    from lorafit.train.replay_token_penalty import described

    latin = smol_tokenizer.encode(" Juniper assistant", add_special_tokens=False)
    chinese = smol_tokenizer.encode("助手", add_special_tokens=False)  # bytes split over tokens
    pieces = [t for t in chinese if "\ufffd" in smol_tokenizer.decode([t])]
    assert pieces, "the tokenizer no longer splits these characters into byte pieces"
    text = described(latin + pieces, smol_tokenizer)
    assert text.startswith(", ".join(repr(smol_tokenizer.decode([t])) for t in latin))
    assert text.endswith(f"({len(pieces)} byte pieces of characters that take several tokens)")
    assert "\ufffd" not in text
    assert described(pieces, smol_tokenizer) == f"({len(pieces)} byte pieces of characters that take several tokens)"
    assert described(latin * 30, smol_tokenizer, shown=3).endswith(", ...")
