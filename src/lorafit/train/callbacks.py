"""Training reports: `metrics.jsonl`, `loss.png`, and a readable progress line per log.

Callbacks only read what the Trainer logs (`LorafitTrainer.log` adds tokens/s, trained tokens and
perplexity); they never change training. Every file is written by the world's rank 0 only, so a
multi-process run produces one report, not one per process.

On a terminal the progress is a tqdm bar with one line per log above it. When stdout or stderr is
not a terminal (a log file, CI, `nohup`, the web UI reading a run) there is no bar: a redrawn bar
is carriage returns and cursor escapes in a file. Each log is then one plain line with an ETA.
Whether the output is a terminal, and switching the libraries' own bars off, is
`lorafit.plain_output`, shared with every other command.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from lorafit.plain_output import output_is_terminal  # noqa: F401  (train/run.py imports it from here)

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
# Logged keys renamed for the report, and their printing order on the progress line.
RENAMED_KEYS = {"learning_rate": "lr"}
PROGRESS_KEYS = ("loss", "eval_loss", "eval_perplexity", "lr", "grad_norm", "tokens_per_second")
SUMMARY_KEYS = ("train_runtime", "train_loss")


def metrics_record(logs: dict, step: int, epoch: float | None) -> dict:
    """One JSON-able line of metrics.jsonl: step and epoch first, then the logged values."""
    record = {"step": step, "epoch": round(epoch, 4) if epoch is not None else None}
    for key, value in logs.items():
        if key in ("epoch", "total_flos"):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON has no NaN; a missing value reads better than a crash in a plot script
        record[RENAMED_KEYS.get(key, key)] = value
    return record


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Train and eval loss against optimizer step; None when there is nothing to plot yet."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, safe in headless runs and worker processes
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        axes.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o", linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean over trained tokens)")
    from lorafit.train.eval_prompts import pass_rate_series

    rates = pass_rate_series(records)
    if rates:  # --eval_prompts: pass rates on a second axis, so forgetting shows beside the loss
        right = axes.twinx()
        for key, points in rates.items():
            right.plot(*zip(*points), label=key, marker=".", linestyle="--", linewidth=1)
        right.set_ylim(-0.05, 1.05)
        right.set_ylabel("eval prompts passed (fraction)")
        right.legend(loc="upper right", fontsize=7)
    if title:
        axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left" if rates else "best")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


class MetricsReportCallback(TrainerCallback):
    """Appends every log to `<output_dir>/metrics.jsonl` and redraws `loss.png` at saves and at the end.

    On resume the lines logged after the checkpoint's step (by the interrupted run) are dropped, so
    the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: str | Path, title: str = ""):
        self.output_dir = Path(output_dir)
        self.title = title

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= state.global_step]
        if state.global_step == 0:
            kept = []
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        with self.metrics_path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(metrics_record(logs, state.global_step, state.epoch)) + "\n")

    def on_save(self, args, state, control, **kwargs):
        self._plot(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._plot(state)

    def _plot(self, state):
        if state.is_world_process_zero:
            plot_loss(read_metrics(self.metrics_path), self.output_dir / LOSS_PLOT_FILE, self.title)


def format_progress(logs: dict) -> str | None:
    """'loss 1.234 | lr 2.00e-04 | grad_norm 0.53 | tokens_per_second 1234' from a log dict."""
    logs = {RENAMED_KEYS.get(k, k): v for k, v in logs.items()}
    parts = []
    keys = PROGRESS_KEYS + (SUMMARY_KEYS if "train_loss" in logs else ())  # runtime: once, at the end
    for key in keys:
        value = logs.get(key)
        if value is None:
            continue
        if key == "lr":
            parts.append(f"lr {value:.2e}")
        elif key == "tokens_per_second":
            parts.append(f"{value:,.0f} tok/s")
        elif key == "train_runtime":
            parts.append(f"runtime {value:.1f}s")
        else:
            parts.append(f"{key} {value:.4f}")
    return " | ".join(parts) if parts else None


def progress_line(state, logs: dict) -> str | None:
    line = format_progress(logs)
    if line is None:
        return None
    epoch = f" epoch {state.epoch:.2f}" if state.epoch is not None else ""
    return f"step {state.global_step}/{state.max_steps}{epoch} | {line}"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ReadableLogPrinter(TrainerCallback):
    """Replaces the Trainer's PrinterCallback and, off a terminal, its tqdm bar: one plain line per
    log (step, loss, lr, tokens/s, ETA), rank 0 only."""

    def __init__(self):
        self._start: tuple[float, int] | None = None  # (time, step) when this run's training began

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), state.global_step)

    def eta(self, state) -> str | None:
        if self._start is None or state.global_step <= self._start[1] or state.global_step >= state.max_steps:
            return None
        per_step = (time.perf_counter() - self._start[0]) / (state.global_step - self._start[1])
        return format_duration(per_step * (state.max_steps - state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            line = progress_line(state, logs)
            eta = self.eta(state) if "loss" in logs else None
            if line:
                print(line + (f" | ETA {eta}" if eta else ""), flush=True)


class ReadableProgressCallback(ProgressCallback):
    """The Trainer's tqdm bars (steps with ETA, evaluation batches), with one short line per log
    instead of a printed dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        line = progress_line(state, logs)
        if line:
            self.training_bar.write(line)
