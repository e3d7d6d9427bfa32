"""Replay distillation: the base model's top-k distributions as targets, from the dataset through
the collators to the loss, against the plain formula on the model's full logits."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

import lorafit
from lorafit.data.collate import SOFT_TARGET_IDS, SOFT_TARGET_WEIGHTS, PackingCollator, PaddingCollator
from lorafit.train.replay_targets import add_soft_targets, top_k_targets, trained_positions
from lorafit.train.run import main as train_main
from lorafit.train.trained_token_loss import use_trained_token_loss
from model_builders import build_tiny_llama

K = 4


def example(seed: int, prompt: int, answer: int) -> dict:
    ids = torch.randint(3, 128, (prompt + answer,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


def adapted_model():
    model = build_tiny_llama()
    lorafit.add_lora(model, lorafit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                               lora_dropout=0.0))
    return model


def test_targets_are_the_models_top_k_at_trained_positions():
    model = adapted_model().train()
    examples = [example(1, 5, 6), example(2, 3, 9), example(3, 7, 2)]
    got = top_k_targets(model, examples, K, batch_size=2)  # padded batches
    assert model.training  # left as it was found
    model.eval()
    for (ids, probs), item in zip(got, examples):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0]
        expected_probs, expected_ids = torch.softmax(logits[trained_positions(item["labels"])], -1).topk(K)
        assert ids == expected_ids.tolist()
        torch.testing.assert_close(torch.tensor(probs), expected_probs, atol=1e-5, rtol=1e-5)


def reference_loss(model, examples: list[dict], soft: list[bool]) -> torch.Tensor:
    """Sum over all trained positions of -sum_v target(v) log q(v) over their count: the target
    weights for soft examples, the label for the others."""
    total, count = 0.0, 0
    for item, distilled in zip(examples, soft):
        logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0]
        positions = trained_positions(item["labels"])
        log_q = torch.log_softmax(logits[positions], -1)
        if distilled:
            target = torch.zeros_like(log_q)
            target.scatter_(1, torch.tensor(item[SOFT_TARGET_IDS]), torch.tensor(item[SOFT_TARGET_WEIGHTS]))
        else:
            target = torch.nn.functional.one_hot(torch.tensor(item["labels"])[[p + 1 for p in positions]],
                                                 log_q.shape[-1]).float()
        total = total - (target * log_q).sum()
        count += len(positions)
    return total / count


@pytest.mark.parametrize("collator", [PaddingCollator(0), PackingCollator(0)])
def test_soft_and_hard_rows_in_one_batch_give_the_plain_formula(collator):
    """A batch mixing replay rows (soft targets, renormalized top-k at twice a label's weight) and
    task rows (labels), padded or packed, through the model's trained-token loss (unpadding
    included): loss and gradients as the formula."""
    teacher = build_tiny_llama()
    examples = [example(1, 5, 6), example(2, 3, 9), example(3, 7, 4)]
    soft = [True, False, True]
    targets = top_k_targets(teacher, [e for e, s in zip(examples, soft) if s], K)
    targets = iter(targets)
    for item, distilled in zip(examples, soft):
        ids, probs = next(targets) if distilled else ([], [])
        item[SOFT_TARGET_IDS] = ids
        item[SOFT_TARGET_WEIGHTS] = [[2.0 * p / sum(position) for p in position] for position in probs]

    model = adapted_model()
    model.train()
    expected = reference_loss(model, examples, soft)
    expected_grads = torch.autograd.grad(expected, [p for p in model.parameters() if p.requires_grad])
    assert use_trained_token_loss(model)
    batch = collator(examples)
    assert batch[SOFT_TARGET_IDS].shape == (sum(len(trained_positions(e["labels"])) for e in examples), K)
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_a_batch_without_replay_rows_has_no_soft_targets():
    examples = [{**example(1, 5, 6), SOFT_TARGET_IDS: [], SOFT_TARGET_WEIGHTS: []}]
    assert SOFT_TARGET_IDS not in PaddingCollator(0)(examples)


def test_only_rows_from_the_replay_file_get_targets(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    rows = [example(1, 5, 6), example(2, 3, 9), example(3, 7, 2)]
    dataset = datasets.Dataset.from_list([{**row, "source": source}
                                          for row, source in zip(rows, ["task.json:1", "/x/replay.jsonl:1",
                                                                        "/x/replay.jsonl:2"])])
    with_targets = add_soft_targets(dataset, build_tiny_llama(), str(tiny_model_dir), "/x/replay.jsonl", K)
    ids = with_targets[SOFT_TARGET_IDS]
    assert ids[0] == [] and with_targets[SOFT_TARGET_WEIGHTS][0] == []
    assert [len(row) for row in ids[1:]] == [len(trained_positions(r["labels"])) for r in rows[1:]]
    assert all(len(position) == K for row in ids[1:] for position in row)
    untouched = add_soft_targets(dataset, build_tiny_llama(), str(tiny_model_dir), "/y/other.jsonl", K)
    assert untouched.column_names == dataset.column_names  # no replay row: nothing added
    weights = add_soft_targets(dataset, build_tiny_llama(), str(tiny_model_dir), "/x/replay.jsonl", K,
                               replay_weight=3.0)[SOFT_TARGET_WEIGHTS]
    assert all(abs(sum(position) - 3.0) < 1e-5 for row in weights[1:] for position in row)


def test_a_run_with_replay_distillation_trains(quick_args, finished_replay, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="lorafit.train.replay_targets")
    assert train_main(quick_args(out, "--replay_prompts", str(finished_replay), "--replay_distill_top_k", "8")) == 0
    assert "replay distillation: the base model's top-8 tokens at" in caplog.text
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(loss is None or loss == loss for loss in losses) and any(losses)


def test_replay_distillation_without_the_trained_token_loss_is_one_error(quick_args, finished_replay, tmp_path,
                                                                         capsys):
    from lorafit.cli import main

    args = quick_args(tmp_path / "run", "--replay_prompts", str(finished_replay), "--replay_distill_top_k", "8",
                      "--trained_token_loss", "false")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "--replay_distill_top_k needs lorafit's trained-token loss" in err and "Traceback" not in err


def test_targets_are_cached_and_read_back_the_same(tiny_model_dir, tmp_path, monkeypatch):
    from lorafit.train import replay_targets

    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    examples = [example(1, 5, 6), example(2, 3, 9)]
    first = replay_targets.cached_top_k_targets(build_tiny_llama(), str(tiny_model_dir), examples, K)
    assert len(list((tmp_path / "home" / "replay").glob("targets-*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(replay_targets, "top_k_targets", refuse)
    assert replay_targets.cached_top_k_targets(None, str(tiny_model_dir), examples, K) == first
    with pytest.raises(AssertionError, match="recomputed"):  # other rows, other key
        replay_targets.cached_top_k_targets(None, str(tiny_model_dir), examples[:1], K)


def test_the_embedded_models_targets_for_the_recipe_ship_with_lorafit(embedded_model_path, tmp_path, monkeypatch):
    """The persona recipe's replay targets on the default model are found under their cache key (a
    change of the prompts, template, cutoff or K without `python -m lorafit.train.replay_targets`
    fails here), and they are the base model's: its greedy answer token is the top-1 target."""
    from pathlib import Path

    from lorafit.train import replay_targets

    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("lorafit.models.embedded_model_dir", lambda: Path(embedded_model_path))
    rows, top_k = replay_targets.recipe_replay_rows(embedded_model_path)
    assert top_k > 1
    shipped = replay_targets.shipped_folder() / replay_targets.cache_name(embedded_model_path, rows, top_k)
    assert shipped.is_file()
    targets = replay_targets.read_targets(shipped)
    agree = total = 0
    for row, (ids, probs) in zip(rows, targets, strict=True):
        positions = trained_positions(row["labels"])
        assert len(ids) == len(positions) and all(len(p) == top_k for p in probs)
        assert all(p == sorted(p, reverse=True) and sum(p) <= 1.01 for p in probs)
        agree += sum(ids[i][0] == row["labels"][position + 1] for i, position in enumerate(positions))
        total += len(positions)
    assert agree >= 0.97 * total  # greedy decoding chose the top token (ties and float noise aside)


@pytest.mark.parametrize("flags,message", [
    (["--replay_prompts", "builtin", "--replay_weight", "2"], "--replay_weight weighs the replay's soft targets"),
    (["--replay_prompts", "builtin", "--replay_distill_top_k", "8", "--replay_weight", "0"],
     "--replay_weight must be positive"),
    (["--replay_prompts", "builtin", "--replay_distill_top_k", "-1"], "--replay_distill_top_k must be 0 (off) or more"),
])
def test_replay_target_flags_out_of_place_are_one_error(quick_args, tmp_path, capsys, flags, message):
    from lorafit.cli import main

    assert main(["train", *quick_args(tmp_path / "run", *flags)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
