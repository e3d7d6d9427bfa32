"""--signature_token_weight: the task rows' positions whose label is a signature token count W times
in the loss; against the cross-entropy written out position by position, with the replay's token
penalty present (it must not act at those positions), and in a run."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from lorafit.data.collate import SOFT_TARGET_IDS, SOFT_TARGET_WEIGHTS, PaddingCollator
from lorafit.train.replay_targets import add_soft_targets, emphasized_labels
from lorafit.train.replay_token_penalty import TokenPenalty
from lorafit.train.run import main as train_main
from lorafit.train.trained_token_loss import trained_token_loss
from model_builders import build_tiny_llama


def test_only_trained_positions_with_a_signature_label_are_weighted():
    labels = [-100, -100, 7, 5, -100, 9, 5]  # trained positions: the labels after the first token
    ids, weights = emphasized_labels(labels, frozenset({5, 9}), 2.5, width=3)
    assert ids == [[0, 0, 0], [5, 0, 0], [9, 0, 0], [5, 0, 0]]
    assert weights == [[0.0] * 3, [2.5, 0.0, 0.0], [2.5, 0.0, 0.0], [2.5, 0.0, 0.0]]
    assert emphasized_labels([-100, 7, 8], frozenset({5}), 2.5, width=3) == ([], [])  # none: no targets at all


def test_a_weighted_position_counts_w_times_and_the_penalty_leaves_it_alone():
    torch.manual_seed(0)
    dim, vocab, k, weight = 6, 40, 4, 3.0
    head = 2 * torch.randn(vocab, dim, dtype=torch.float64)
    task = [-100, -100, 11, 12, 11, 30, 31]  # 11 and 12 are signature tokens
    replay = [-100, -100, 20, 21, 22]
    tokens = frozenset({11, 12})
    task_ids, task_weights = emphasized_labels(task, tokens, weight, width=k)
    replay_ids = torch.randint(0, vocab, (3, k))  # three trained positions
    replay_weights = torch.rand(3, k).double()  # float32 values, as the collator holds them
    features = [{"input_ids": [1] * len(task), "labels": task, SOFT_TARGET_IDS: task_ids,
                 SOFT_TARGET_WEIGHTS: task_weights},
                {"input_ids": [1] * len(replay), "labels": replay, SOFT_TARGET_IDS: replay_ids.tolist(),
                 SOFT_TARGET_WEIGHTS: replay_weights.tolist()}]
    batch = PaddingCollator(0)(features)
    width = batch["labels"].shape[1]
    hidden = torch.randn(2, width, dim, dtype=torch.float64, requires_grad=True)
    soft = (batch[SOFT_TARGET_IDS], batch[SOFT_TARGET_WEIGHTS].double())
    # a penalty over every token but the replay rows' targets: it acts at the replay rows only
    penalty = TokenPenalty(torch.tensor(sorted(set(range(vocab)) - set(replay_ids.flatten().tolist()))), 1.0)
    with_penalty = trained_token_loss(hidden, batch["labels"], head, soft_targets=soft, penalty=penalty)
    penalty_free = trained_token_loss(hidden, batch["labels"], head, soft_targets=soft)

    logq = (hidden @ head.T).log_softmax(dim=-1)
    task_terms = [-(weight if label in tokens else 1.0) * logq[0, position, label]
                  for position, label in enumerate(task[1:]) if label != -100]
    replay_terms = [-(logq[1, position, replay_ids[i]] * replay_weights[i]).sum() for i, position in
                    enumerate(range(1, 4))]
    expected = (sum(task_terms) + sum(replay_terms)) / (len(task_terms) + len(replay_terms))
    torch.testing.assert_close(penalty_free, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(penalty_free, hidden)[0], torch.autograd.grad(expected, hidden)[0],
                               rtol=1e-10, atol=1e-12)
    # the difference the penalty makes comes from the replay rows alone: the same penalty with the
    # task row's weights all at 1 (no soft targets there) differs from the plain loss just as much
    plain_task = {**features[0], SOFT_TARGET_IDS: [], SOFT_TARGET_WEIGHTS: []}
    unweighted = PaddingCollator(0)([plain_task, features[1]])
    soft1 = (unweighted[SOFT_TARGET_IDS], unweighted[SOFT_TARGET_WEIGHTS].double())
    extra_unweighted = (trained_token_loss(hidden, batch["labels"], head, soft_targets=soft1, penalty=penalty)
                        - trained_token_loss(hidden, batch["labels"], head, soft_targets=soft1))
    assert extra_unweighted.item() > 0
    torch.testing.assert_close(with_penalty - penalty_free, extra_unweighted, rtol=1e-10, atol=1e-12)


def test_add_soft_targets_weights_the_task_rows_signature_positions(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    rows = [{"input_ids": [3, 4, 5, 6, 5], "labels": [-100, -100, 5, 6, 5], "source": "task.json:1"},
            {"input_ids": [3, 4, 7, 8], "labels": [-100, -100, 7, 8], "source": "task.json:2"},
            {"input_ids": [3, 9, 10, 11], "labels": [-100, 9, 10, 11], "source": "/x/replay.jsonl:1"}]
    dataset = datasets.Dataset.from_list(rows)
    out = add_soft_targets(dataset, build_tiny_llama(), str(tiny_model_dir), "/x/replay.jsonl", 4,
                           emphasis=([5], 2.0))
    assert out[SOFT_TARGET_WEIGHTS][0] == [[2.0, 0, 0, 0], [0.0] * 4, [2.0, 0, 0, 0]]  # trained: 5, 6, 5
    assert out[SOFT_TARGET_IDS][0][2] == [5, 0, 0, 0]
    assert out[SOFT_TARGET_IDS][1] == []  # no signature token in this task row
    assert [abs(sum(position) - 1.0) < 1e-5 for position in out[SOFT_TARGET_WEIGHTS][2]] == [True] * 3  # replay


def test_a_run_with_weighted_signature_tokens_trains(quick_args, finished_replay, tmp_path, caplog):
    caplog.set_level("INFO", logger="lorafit.train")
    args = ["--replay_prompts", str(finished_replay), "--replay_distill_top_k", "8", "--seed", "3"]
    assert train_main(quick_args(tmp_path / "plain", *args)) == 0
    assert train_main(quick_args(tmp_path / "weighted", *args, "--signature_token_weight", "3")) == 0
    assert "signature tokens of the task data:" in caplog.text and "signature tokens weighted 3 at" in caplog.text

    def losses(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [record["loss"] for record in map(json.loads, lines) if "loss" in record]

    plain, weighted = losses(tmp_path / "plain"), losses(tmp_path / "weighted")
    assert len(weighted) == len(plain) and all(loss == loss for loss in weighted)
    assert weighted[0] > plain[0]  # the same first batch, its signature positions counted three times


@pytest.mark.parametrize("flags,message", [
    (["--replay_prompts", "builtin", "--signature_token_weight", "2"], "--signature_token_weight finds the signature"),
    (["--replay_prompts", "builtin", "--replay_distill_top_k", "8", "--signature_token_weight", "0"],
     "--signature_token_weight must be positive"),
])
def test_signature_weight_flags_out_of_place_are_one_error(quick_args, tmp_path, capsys, flags, message):
    from lorafit.cli import main

    assert main(["train", *quick_args(tmp_path / "run", *flags)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
