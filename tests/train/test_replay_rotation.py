"""Replay rotation: each epoch trains on every task row and the next slice of the replay rows, in an
order fixed by (seed, epoch), with the epoch taken from the Trainer (also after a resume)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lorafit.train.replay_rotation import ReplayRotationCallback, ReplayRotationSampler, split_rows
from lorafit.train.run import main as train_main

TASK = list(range(7))
REPLAY = list(range(7, 17))  # 10 replay rows


def epoch_rows(sampler: ReplayRotationSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_every_epoch_has_all_task_rows_and_the_replay_pool_is_covered_over_the_run():
    sampler = ReplayRotationSampler(TASK, REPLAY, epochs=3, seed=5)
    assert sampler.per_epoch == 4 and len(sampler) == 7 + 4
    seen = []
    for epoch in range(3):
        rows = epoch_rows(sampler, epoch)
        assert len(rows) == len(sampler) == len(set(rows))
        assert sorted(r for r in rows if r in TASK) == TASK
        seen.append({r for r in rows if r in REPLAY})
    assert set().union(*seen) == set(REPLAY)  # 12 places for 10 rows: all of them, two twice
    assert not seen[0] & seen[1] and sum(len(s) for s in seen) == 12


def test_with_a_pool_that_divides_the_slices_are_disjoint():
    sampler = ReplayRotationSampler(TASK, list(range(7, 19)), epochs=3, seed=0)
    slices = [set(sampler.replay_slice(epoch)) for epoch in range(3)]
    assert [len(s) for s in slices] == [4, 4, 4] and set().union(*slices) == set(range(7, 19))


@pytest.mark.parametrize("ratio,per_epoch", [(0.3, 3), (2 / 7, 2), (1 / 7, 1), (0.01, 1), (0.5, 4), (3.0, 4)])
def test_a_ratio_makes_a_small_task_sets_replay_slices_smaller(ratio, per_epoch):
    sampler = ReplayRotationSampler(TASK, REPLAY, epochs=3, seed=0, ratio=ratio)  # 7 task rows, 10 replay rows
    assert sampler.per_epoch == per_epoch  # ceil(ratio * 7), at least 1, at most a third of the pool (4)
    for epoch in range(4):
        rows = epoch_rows(sampler, epoch)
        assert sorted(r for r in rows if r in TASK) == TASK
        assert len([r for r in rows if r in REPLAY]) == len(set(r for r in rows if r in REPLAY)) == per_epoch


def test_with_a_ratio_the_slices_follow_each_other_around_the_pool():
    sampler = ReplayRotationSampler(TASK, REPLAY, epochs=3, seed=4, ratio=3 / 7)  # 3 replay rows an epoch
    slices = [sampler.replay_slice(epoch) for epoch in range(4)]
    assert not set(slices[0]) & set(slices[1]) and not set(slices[1]) & set(slices[2])
    assert len(set().union(*map(set, slices))) == 10  # 12 places: the fourth slice wraps to the pool's start
    assert slices[3][1:] == slices[0][:2]


def test_the_order_is_a_function_of_seed_and_epoch():
    first, again = ReplayRotationSampler(TASK, REPLAY, 3, seed=1), ReplayRotationSampler(TASK, REPLAY, 3, seed=1)
    assert epoch_rows(first, 2) == epoch_rows(again, 2)  # a resumed process draws what the first one drew
    assert epoch_rows(first, 0) != epoch_rows(first, 1)
    assert epoch_rows(first, 0) != epoch_rows(ReplayRotationSampler(TASK, REPLAY, 3, seed=2), 0)


@pytest.mark.parametrize("state_epoch,expected", [(None, 0), (0.0, 0), (1.0, 1), (1.5, 1), (2.75, 2)])
def test_the_callback_hands_the_sampler_the_starting_epoch(state_epoch, expected):
    sampler = ReplayRotationSampler(TASK, REPLAY, 3, seed=0)
    ReplayRotationCallback(sampler).on_epoch_begin(None, SimpleNamespace(epoch=state_epoch), None)
    assert sampler.epoch == expected


def test_rows_are_split_by_their_source_file():
    sources = ["task.json:1", "/x/replay.jsonl:1", "task.json:2", "/x/replay.jsonl:2"]
    assert split_rows(sources, "/x/replay.jsonl") == ([0, 2], [1, 3])


def test_a_rotating_run_trains_each_epoch_on_its_own_slice(quick_args, finished_replay, tmp_path, caplog,
                                                           monkeypatch):
    epochs = []
    original = ReplayRotationSampler.__iter__

    def recording(self):
        rows = list(original(self))
        epochs.append((self.epoch, rows))
        return iter(rows)

    monkeypatch.setattr(ReplayRotationSampler, "__iter__", recording)
    caplog.set_level("INFO", logger="lorafit.train")
    out = tmp_path / "run"
    args = quick_args(out, "--replay_prompts", str(finished_replay), "--replay_rotation", "true",
                      "--max_steps", "-1", "--num_train_epochs", "3", "--replay_distill_top_k", "4")
    assert train_main(args) == 0
    assert "each epoch trains on the" in caplog.text and "4 of the 12 replay rows" in caplog.text
    assert [epoch for epoch, _ in epochs] == [0, 1, 2]
    row_sets = [set(rows) for _, rows in epochs]
    task_rows = row_sets[0] & row_sets[1] & row_sets[2]
    replay_slices = [rows - task_rows for rows in row_sets]
    assert [len(s) for s in replay_slices] == [4, 4, 4] and len(set().union(*replay_slices)) == 12
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert max(steps) == 3 * -(-len(epochs[0][1]) // 4)  # batches of 4 over each epoch's rows


@pytest.mark.parametrize("flags,message", [
    (["--packing", "true"], "--replay_rotation picks rows per epoch, and --packing"),
    (["--train_sampling_strategy", "group_by_length"], "does not combine with --train_sampling_strategy"),
])
def test_rotation_with_what_it_cannot_combine_with_is_one_error(quick_args, finished_replay, tmp_path, capsys,
                                                               flags, message):
    from lorafit.cli import main

    args = quick_args(tmp_path / "run", "--replay_prompts", str(finished_replay), "--replay_rotation", "true", *flags)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_runs_replay_ratio_reaches_the_sampler(caplog):
    from lorafit.train.replay_rotation import rotation_sampler

    training = SimpleNamespace(num_train_epochs=3, data_seed=None, seed=0, replay_ratio=1.2)
    config = SimpleNamespace(training=training, data=SimpleNamespace(train_file=["task.json", "/x/replay.jsonl"]))
    sources = [f"task.json:{i}" for i in range(5)] + [f"/x/replay.jsonl:{i}" for i in range(30)]
    caplog.set_level("INFO", logger="lorafit.train")
    sampler = rotation_sampler(config, {"source": sources})
    assert sampler.per_epoch == 6 and "the 5 task rows and 6 of the 30 replay rows" in caplog.text  # not 10
