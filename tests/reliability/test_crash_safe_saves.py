"""Crash-safe saves: a checkpoint exists only once whole, so a run killed at any instant (during a
save included) resumes from the last complete checkpoint and ends with the uninterrupted adapter;
`--resume_from_checkpoint auto` skips a checkpoint with a file missing."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import time

import pytest
import torch
from transformers import TrainerCallback

from lorafit.errors import UserError
from lorafit.train import run
from lorafit.train.checkpoints import STAGING_DIR, checkpoint_problems
from lorafit.train.trainer import LorafitTrainer
from reliability_helpers import EXACT_RESUME_ARGS, assert_same_adapter, lorafit_command, subprocess_env

SAVES = ("--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "3")


class CrashAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.step:
            raise KeyboardInterrupt(f"simulated crash after step {state.global_step}")


def crash_with(monkeypatch, callback):
    original_build = run.build_trainer

    def build(*args, **kwargs):
        trainer = original_build(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(run, "build_trainer", build)


def test_auto_resume_skips_a_checkpoint_missing_a_file(tmp_path, run_args, reference_adapter, monkeypatch, caplog):
    output_dir = tmp_path / "run"
    argv = run_args(output_dir, *EXACT_RESUME_ARGS, *SAVES)
    crash_with(monkeypatch, CrashAfterStep(6))
    with pytest.raises(KeyboardInterrupt):
        run.main(argv)
    monkeypatch.undo()
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    (output_dir / "checkpoint-6" / "optimizer.pt").unlink()  # as a copy cut short, or an older writer, leaves it

    with caplog.at_level(logging.WARNING, logger="lorafit"):
        assert run.main([*argv, "--resume_from_checkpoint", "auto"]) == 0
    assert "skipping" in caplog.text and "checkpoint-6" in caplog.text and "optimizer.pt is missing" in caplog.text
    assert_same_adapter(output_dir, reference_adapter)  # resumed from checkpoint-3


def test_an_explicit_incomplete_checkpoint_is_a_user_error(tmp_path, run_args):
    checkpoint = tmp_path / "run" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match="incomplete checkpoint.*adapter or model weights"):
        run.main(run_args(tmp_path / "run", "--resume_from_checkpoint", str(checkpoint)))


def test_a_save_cut_short_leaves_no_checkpoint_and_resume_uses_the_one_before(
        tmp_path, run_args, reference_adapter, monkeypatch):
    output_dir = tmp_path / "run"
    argv = run_args(output_dir, *EXACT_RESUME_ARGS, *SAVES)
    original = LorafitTrainer._save_rng_state

    def dies_during_the_second_save(self, output_dir):  # after the adapter and optimizer were written
        if self.state.global_step == 6:
            raise KeyboardInterrupt("killed during the save of checkpoint-6")
        return original(self, output_dir)

    monkeypatch.setattr(LorafitTrainer, "_save_rng_state", dies_during_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        run.main(argv)
    monkeypatch.undo()
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (output_dir / STAGING_DIR / "checkpoint-6" / "optimizer.pt").is_file()  # the half-written one

    assert run.main([*argv, "--resume_from_checkpoint", "auto"]) == 0
    assert_same_adapter(output_dir, reference_adapter)
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    assert not (output_dir / STAGING_DIR).exists()  # the next save cleared what the killed one left


def test_sigkill_at_random_instants_leaves_whole_checkpoints_and_resume_is_exact(
        tmp_path, run_args, reference_adapter):
    # A checkpoint every step, so most kills land in or near a save.
    rng = random.Random(12)
    for attempt in range(3):
        output_dir = tmp_path / f"run{attempt}"
        argv = run_args(output_dir, *EXACT_RESUME_ARGS, "--save_strategy", "steps", "--save_steps", "1",
                        "--save_total_limit", "2")
        # As many threads as this process, which resumes the run and made the reference: on some CPUs
        # the float sums of a matmul depend on how many threads share it.
        env = subprocess_env(OMP_NUM_THREADS=str(torch.get_num_threads()))
        process = subprocess.Popen(lorafit_command("train", *argv), stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            after_step = rng.randint(1, 6)  # each step logs, then saves: the kill lands in a step or a save
            for line in process.stdout:
                if line.startswith(f"step {after_step}/"):
                    break
            time.sleep(rng.uniform(0.0, 0.1))
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            process.kill()
        checkpoints = list(output_dir.glob("checkpoint-*"))
        assert checkpoints, "killed before the first checkpoint: the test did not test anything"
        for checkpoint in checkpoints:
            assert checkpoint_problems(checkpoint) == [], checkpoint
        assert run.resolve_resume(run_args_config(argv)) == str(max(checkpoints, key=step_of))
        assert run.main([*argv, "--resume_from_checkpoint", "auto"]) == 0
        assert_same_adapter(output_dir, reference_adapter)


def step_of(path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def run_args_config(argv):
    from lorafit.train.args import parse_train_args

    return parse_train_args([*argv, "--resume_from_checkpoint", "auto"])
