"""Graceful stop: SIGINT or SIGTERM saves a checkpoint at the end of the current step, exits
non-zero naming the resume command, and resuming ends with the uninterrupted adapter."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time

import pytest
from transformers import TrainerCallback

from lorafit.errors import TrainingStopped
from lorafit.train import run
from lorafit.train.args import parse_train_args
from lorafit.train.checkpoints import checkpoint_problems
from reliability_helpers import EXACT_RESUME_ARGS, assert_same_adapter, lorafit_command, subprocess_env


class SignalDuringStep(TrainerCallback):
    """Sends `signum` to this process at the start of optimizer step `step` (1-based)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


def resume_argv(message: str) -> list[str]:
    command = shlex.split(message.split("resume with: ", 1)[1])
    assert command[:2] == ["lorafit", "train"]
    return command[2:]


def test_sigterm_saves_at_the_step_end_and_resuming_gives_the_uninterrupted_adapter(
        tmp_path, run_args, reference_adapter, monkeypatch):
    output_dir = tmp_path / "run"
    argv = run_args(output_dir, *EXACT_RESUME_ARGS)
    original_build = run.build_trainer

    def build_with_signal(*args, **kwargs):
        trainer = original_build(*args, **kwargs)
        trainer.add_callback(SignalDuringStep(signal.SIGTERM, step=4))
        return trainer

    monkeypatch.setattr(run, "build_trainer", build_with_signal)
    previous_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped) as stopped:
        run.main(argv)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is previous_handler  # handlers are put back
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    message = str(stopped.value)
    assert "SIGTERM" in message and "step 4/8" in message
    checkpoint = output_dir / "checkpoint-4"  # the step that was running when the signal came
    assert checkpoint_problems(checkpoint) == []
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-4"]
    assert not (output_dir / "adapter_model.safetensors").exists()  # no final adapter from a stopped run
    resumed = resume_argv(message)
    assert resumed[-2:] == ["--resume_from_checkpoint", str(checkpoint)]

    assert run.main(resumed) == 0
    assert_same_adapter(output_dir, reference_adapter)


def test_ctrl_c_on_the_command_line_exits_130_with_the_command_that_resumes(tmp_path, run_args):
    output_dir = tmp_path / "run"
    argv = run_args(output_dir, "--max_steps", "5000")  # long enough to be interrupted mid-run
    process = subprocess.Popen(lorafit_command("train", *argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=subprocess_env())
    try:
        for line in process.stdout:  # wait until training is under way
            if line.startswith("step 3/"):
                break
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert time.monotonic() - started < 30  # it stopped after a step, not at the end of the run
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    message = [line for line in stderr.splitlines() if line.startswith("lorafit train: stopped by SIGINT")]
    assert len(message) == 1, stderr[-3000:]
    resumed = resume_argv(message[0])
    checkpoint = resumed[-1]
    assert checkpoint_problems(output_dir / os.path.basename(checkpoint)) == []
    config = parse_train_args(resumed)  # the printed command is the run's own, resuming there
    assert run.resolve_resume(config) == checkpoint
    assert resumed == [*argv, "--resume_from_checkpoint", checkpoint]
