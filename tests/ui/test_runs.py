"""Runs without a browser: reading metrics.jsonl and the progress line, the state of a run folder,
the run list, and a real `lorafit train` child process on the tiny model started, stopped (SIGTERM:
a checkpoint) and resumed to the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lorafit.ui.jobs import Jobs, write_state
from lorafit.ui.runs import RUN_LOG, RUN_STATE, Runs, progress, read_metrics_from


def test_metrics_are_read_from_an_index_and_a_half_written_line_waits(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo', encoding="utf-8")
    assert read_metrics_from(path) == ([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], 2)
    assert read_metrics_from(path, since=1) == ([{"step": 2, "loss": 1.5}], 2)
    path.write_text('{"step": 1, "loss": 2.0}\n', encoding="utf-8")  # a resumed run rewrote it shorter
    assert read_metrics_from(path, since=2) == ([], 1)
    assert read_metrics_from(tmp_path / "missing.jsonl") == ([], 0)


def test_progress_and_eta_come_from_the_last_plain_progress_line():
    lines = ["12:00:01 INFO lorafit.train: trainable parameters: 10",
             "step 3/8 epoch 0.38 | loss 3.3043 | lr 1.90e-04 | grad_norm 3.6735 | 5 tok/s | ETA 2m58s",
             "step 4/8 epoch 0.50 | loss 2.8082 | lr 1.62e-04 | 8 tok/s | ETA 12s", "some warning"]
    assert progress(lines) == {"step": 4, "max_steps": 8, "eta": "12s"}
    assert progress(["step 8/8 epoch 1.00 | runtime 179.9s | train_loss 2.8456"])["eta"] is None
    assert progress([]) == {"step": None, "max_steps": None, "eta": None}


def make_run(folder: Path, *, exit_code=None, adapter=False, checkpoint=False, pid=None) -> Path:
    folder.mkdir(parents=True)
    (folder / "lorafit_config.yaml").write_text("lora_rank: 8\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    if adapter:
        (folder / "adapter_config.json").write_text("{}")
    if checkpoint:
        saved = folder / "checkpoint-2"
        saved.mkdir()
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (saved / name).write_bytes(b"x")
        (saved / "adapter_config.json").write_text("{}")
        (saved / "trainer_state.json").write_text("{}")
    if exit_code is not None or pid is not None:
        write_state(folder / RUN_STATE, {"argv": ["--train_file", "a.jsonl"], "attempt": 1, "pid": pid,
                                         "started": time.time(), "exit_code": exit_code})
        (folder / RUN_LOG).write_text("$ lorafit train --train_file a.jsonl\nstep 2/8 | loss 2.0 | ETA 3s\n"
                                      "lorafit train: error: something the user must fix\n")
    return folder


def test_run_states_from_exit_codes_and_files(tmp_path, monkeypatch):
    import lorafit.ui.runs as runs_module

    monkeypatch.setattr(runs_module, "complete_checkpoints",
                        lambda folder: sorted(folder.glob("checkpoint-*")))  # fake files: not loadable
    runs = Runs(tmp_path / "runs", Jobs(), tmp_path / "state")
    finished = make_run(tmp_path / "runs" / "finished", exit_code=0, adapter=True)
    stopped = make_run(tmp_path / "runs" / "stopped", exit_code=143, checkpoint=True)
    failed = make_run(tmp_path / "runs" / "failed", exit_code=2)
    from_cli = make_run(tmp_path / "runs" / "from-cli", adapter=True)  # trained with lorafit train, not the page
    (tmp_path / "runs" / "not-a-run").mkdir()
    states = {run["name"]: run for run in runs.listing()}
    assert set(states) == {"finished", "stopped", "failed", "from-cli"}
    assert states["finished"]["state"] == "finished" and states["finished"]["adapter"] == str(finished)
    assert states["stopped"]["state"] == "stopped" and states["stopped"]["resumable"]
    assert states["stopped"]["adapter"] == str(stopped / "checkpoint-2")
    assert states["failed"]["state"] == "failed" and not states["failed"]["resumable"]
    assert states["failed"]["message"] == "lorafit train: error: something the user must fix"
    assert states["from-cli"]["state"] == "finished" and not states["from-cli"]["from_page"]
    assert runs.describe(failed, since=0)["metrics"] == [{"step": 1, "loss": 2.0}]
    assert runs.describe(from_cli)["step"] is None


def test_a_run_whose_pid_is_gone_is_not_running(tmp_path):
    folder = make_run(tmp_path / "runs" / "lost", pid=2**22 + 12345)  # no such process
    described = Runs(tmp_path / "runs", Jobs(), tmp_path / "state").describe(folder)
    assert not described["running"] and described["state"] == "failed"


def wait_for(condition, timeout=180.0, poll=0.2):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


@pytest.mark.slow
def test_a_real_run_starts_stops_with_a_checkpoint_and_resumes_to_the_end(tmp_path, tiny_model_dir, ui_data):
    runs = Runs(tmp_path / "runs", Jobs(), tmp_path / "state")
    output_dir = tmp_path / "elsewhere" / "run"  # outside runs_dir: the page remembers it
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file", str(ui_data["good"]), "--output_dir",
            str(output_dir), "--per_device_train_batch_size", "2", "--max_steps", "400", "--logging_steps", "1",
            "--save_strategy", "no", "--cutoff_len", "64"]
    started = runs.start(argv, str(output_dir))
    assert started["running"] and started["state"] == "preparing"
    wait_for(lambda: (runs.describe(output_dir)["step"] or 0) >= 2)
    assert runs.describe(output_dir)["state"] == "training"
    assert runs.stop(output_dir)
    wait_for(lambda: not runs.describe(output_dir)["running"])
    stopped = runs.describe(output_dir, since=0)
    assert stopped["state"] == "stopped" and stopped["resumable"], stopped["log_tail"]
    step = int(Path(stopped["checkpoint"]).name.split("-")[1])
    assert stopped["step"] == step and len(stopped["metrics"]) >= 2
    assert "resume with: lorafit train" in stopped["message"]
    assert [run["path"] for run in runs.listing()] == [str(output_dir.resolve())]

    job = json.loads((output_dir / RUN_STATE).read_text())
    job["argv"][job["argv"].index("400")] = str(step + 3)  # finish soon after the checkpoint
    write_state(output_dir / RUN_STATE, job)
    resumed = runs.resume(output_dir)
    assert resumed["attempt"] == 2 and resumed["command"].endswith("--resume_from_checkpoint auto")
    wait_for(lambda: not runs.describe(output_dir)["running"])
    finished = runs.describe(output_dir, since=0)
    assert finished["state"] == "finished", finished["log_tail"]
    assert finished["step"] == step + 3 == finished["max_steps"]
    assert [r["step"] for r in finished["metrics"] if "loss" in r] == list(range(1, step + 4))
