"""Storage faults: a failed write (disk full, permission denied) is a one-line error naming the path,
and the checkpoints already saved are untouched."""

from __future__ import annotations

import errno
import hashlib

import pytest

from lorafit.errors import TrainingStopped
from lorafit.train import run
from lorafit.train.checkpoints import checkpoint_problems
from lorafit.train.trainer import LorafitTrainer


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_disk_full_during_a_checkpoint_names_it_and_keeps_the_earlier_one(tmp_path, run_args, monkeypatch):
    output_dir = tmp_path / "run"
    argv = run_args(output_dir, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3",
                    "--save_total_limit", "1")
    original = LorafitTrainer._save_optimizer_and_scheduler
    before = {}

    def disk_full_at_step_6(self, folder):
        if self.state.global_step == 6:
            before.update(digest(output_dir / "checkpoint-3"))
            raise OSError(errno.ENOSPC, "No space left on device", f"{folder}/optimizer.pt")
        return original(self, folder)

    monkeypatch.setattr(LorafitTrainer, "_save_optimizer_and_scheduler", disk_full_at_step_6)
    with pytest.raises(TrainingStopped) as stopped:
        run.main(argv)
    message = str(stopped.value)
    assert "\n" not in message and stopped.value.exit_code == 1
    assert f"could not write {output_dir / 'checkpoint-6'}: No space left on device" in message
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-3"]  # not rotated away
    assert digest(output_dir / "checkpoint-3") == before and checkpoint_problems(output_dir / "checkpoint-3") == []


def test_permission_denied_on_the_final_save_is_one_line_from_the_cli(tmp_path, run_args, monkeypatch, capsys):
    from lorafit import cli

    output_dir = tmp_path / "run"
    target = output_dir / "adapter_model.safetensors"

    def denied(staged, folder):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(run, "publish_files", denied)
    assert cli.main(["train", *run_args(output_dir)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"lorafit train: could not write {output_dir}: Permission denied ({target})")
    assert not target.exists()
