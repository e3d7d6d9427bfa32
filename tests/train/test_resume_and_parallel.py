"""Checkpoints hold only the adapter and resume exactly; two processes train data-parallel, one writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from lorafit.train import run

REPO = Path(__file__).resolve().parents[2]


class CrashAfterStep(TrainerCallback):
    """Simulates a killed job: raises once training has passed `step` (after its checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.step:
            raise KeyboardInterrupt(f"simulated crash after step {state.global_step}")


def test_resume_after_a_crash_ends_with_the_same_adapter(tmp_path, quick_args, monkeypatch):
    # Dropout on and several steps per epoch: data order, dropout RNG, optimizer moments and the
    # schedule all have to be restored for the adapters to match.
    common = ("--max_steps", "8", "--save_strategy", "steps", "--save_steps", "3", "--learning_rate", "1e-2",
              "--lora_dropout", "0.1", "--save_total_limit", "2")
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run.main(quick_args(uninterrupted, *common))

    original_build = run.build_trainer

    def build_with_crash(*args, **kwargs):
        trainer = original_build(*args, **kwargs)
        trainer.add_callback(CrashAfterStep(4))
        return trainer

    monkeypatch.setattr(run, "build_trainer", build_with_crash)
    with pytest.raises(KeyboardInterrupt):
        run.main(quick_args(resumed, *common))
    monkeypatch.undo()
    checkpoint = resumed / "checkpoint-3"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "optimizer.pt", "rng_state.pth",
        "scheduler.pt", "tokenizer.json", "tokenizer_config.json", "trainer_state.json"]  # no base weights
    assert not (resumed / "adapter_model.safetensors").exists()

    run.main(quick_args(resumed, *common, "--resume_from_checkpoint", "auto"))
    expected = load_file(str(uninterrupted / "adapter_model.safetensors"))
    actual = load_file(str(resumed / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]  # limit 2
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))  # the crashed run's step-4 log was dropped, no duplicates


def test_resume_from_a_path_that_is_not_a_checkpoint_is_a_user_error(tmp_path, quick_args):
    from lorafit.errors import UserError

    with pytest.raises(UserError, match="not a checkpoint folder"):
        run.main(quick_args(tmp_path / "out", "--resume_from_checkpoint", str(tmp_path)))


def test_two_processes_train_data_parallel_and_write_one_adapter(tmp_path, tiny_model_dir, identity_files):
    train, _ = identity_files
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lorafit", "train", "--model_name_or_path", tiny_model_dir, "--train_file", str(train),
               "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "3",
               "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3]  # one writer: each step logged once
    # Data parallel: a step takes 4 examples on each of 2 processes, so an epoch of 60 is 8 steps
    # (it would be 15 if each process went through all the data on its own).
    assert train_logs[-1]["epoch"] == pytest.approx(3 / 8, abs=1e-3)
    assert result.stdout.count("trained in") == 1
