"""Numerical faults: a step with a non-finite loss or gradient norm changes no weight; after
--max_nonfinite_steps of them in a row the run stops with a clear message, keeping the last good
checkpoint."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import TrainerCallback

from lorafit.errors import TrainingStopped, UserError
from lorafit.lora.adapter_io import adapter_state_dict
from lorafit.train import run
from lorafit.train.checkpoints import checkpoint_problems


class InjectNonFinite(TrainerCallback):
    """Makes the loss (or, with `where="gradient"`, one adapter gradient) NaN during the given steps."""

    def __init__(self, trainer, steps: set[int], where: str = "loss"):
        self.trainer, self.steps, self.where = trainer, steps, where
        self.adapters_after_step: dict[int, dict[str, torch.Tensor]] = {}
        model = trainer.model
        if where == "loss":
            model.register_forward_hook(self._poison_loss)
        else:
            next(iter(adapter_state_dict(model).values())).register_hook(self._poison_gradient)

    def _faulty_step(self) -> bool:
        return self.trainer.model.training and self.trainer.state.global_step + 1 in self.steps

    def _poison_loss(self, module, inputs, output):
        if self._faulty_step():
            output["loss"] = output["loss"] * float("nan")
        return output

    def _poison_gradient(self, gradient):
        return gradient * float("nan") if self._faulty_step() else gradient

    def on_step_end(self, args, state, control, **kwargs):
        self.adapters_after_step[state.global_step] = {
            key: value.detach().clone() for key, value in adapter_state_dict(self.trainer.model).items()}


def train_with_faults(monkeypatch, argv, steps, where="loss"):
    original_build = run.build_trainer
    injected = []

    def build(*args, **kwargs):
        trainer = original_build(*args, **kwargs)
        injected.append(InjectNonFinite(trainer, steps, where))
        trainer.add_callback(injected[0])
        return trainer

    monkeypatch.setattr(run, "build_trainer", build)
    try:
        return run.main(argv), injected[0]
    except TrainingStopped as stopped:
        return stopped, injected[0]


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, run_args, monkeypatch, caplog, where):
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        result, injected = train_with_faults(monkeypatch, run_args(tmp_path / "run", "--learning_rate", "1e-2"),
                                             steps={3}, where=where)
    assert result == 0
    expected = "loss" if where == "loss" else "gradient norm"
    assert f"step 3: the {expected} is not finite; update skipped" in caplog.text
    after = injected.adapters_after_step
    for key in after[2]:
        assert torch.equal(after[3][key], after[2][key])  # the faulty step changed no weight
        assert torch.isfinite(after[4][key]).all()
    assert any(not torch.equal(after[4][key], after[3][key]) for key in after[3])  # and training went on


def test_repeated_nonfinite_steps_stop_the_run_at_the_last_good_checkpoint(tmp_path, run_args, monkeypatch):
    output_dir = tmp_path / "run"
    argv = run_args(output_dir, "--max_steps", "10", "--save_strategy", "steps", "--save_steps", "2",
                    "--save_total_limit", "1")
    stopped, injected = train_with_faults(monkeypatch, argv, steps={5, 6, 7, 8, 9, 10})
    assert isinstance(stopped, TrainingStopped) and stopped.exit_code == 1
    message = str(stopped)
    assert "stopped at step 7/10" in message and "not finite at 3 steps in a row (steps 5-7" in message
    assert f"{output_dir / 'checkpoint-4'}" in message and "--resume_from_checkpoint" in message
    # The save due at step 6 was not made, so save_total_limit=1 did not rotate checkpoint-4 away.
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-4"]
    assert checkpoint_problems(output_dir / "checkpoint-4") == []
    assert not (output_dir / "adapter_model.safetensors").exists()
    assert sorted(injected.adapters_after_step) == [1, 2, 3, 4, 5, 6, 7]


def test_max_nonfinite_steps_must_be_positive(tmp_path, run_args):
    with pytest.raises(UserError, match="--max_nonfinite_steps"):
        run.main(run_args(tmp_path / "run", "--max_nonfinite_steps", "0"))
