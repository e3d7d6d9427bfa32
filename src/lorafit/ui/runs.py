"""Training runs seen from the page: start, stop, resume, progress, and the list of past runs.

A run is an `--output_dir`. The page starts `lorafit train <flags>` there as a child process
(`jobs`), keeping `ui-run.json` (the flags, pid, exit code) and `train.log` (the command's output)
beside what lorafit writes. Everything shown is read back from those files: the curve from
`metrics.jsonl` (what `MetricsReportCallback` logs), step, total steps and ETA from lorafit's
plain progress line (`step 3/8 ... | ETA 12s`), so a reloaded page, or a restarted `lorafit ui`,
shows the same thing. Stop is SIGTERM: lorafit's graceful stop finishes the step, saves a
checkpoint and exits 143; resume reruns the same flags with `--resume_from_checkpoint auto`.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
from pathlib import Path

from lorafit.train.callbacks import METRICS_FILE
from lorafit.train.checkpoints import checkpoint_problems
from lorafit.ui.jobs import Jobs, log_tail, read_state

RUN_STATE = "ui-run.json"
RUN_LOG = "train.log"
# What makes a folder a run worth listing (lorafit_config.yaml is written first by every run).
RUN_MARKERS = ("lorafit_config.yaml", METRICS_FILE, "adapter_config.json", RUN_STATE)
STOPPED_CODES = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT}
_PROGRESS = re.compile(r"^step (\d+)/(\d+)\b.*?(?:\| ETA (\S+))?$")


def read_metrics_from(path: Path, since: int = 0) -> tuple[list[dict], int]:
    """(metrics.jsonl records from index `since` on, the number of records in the file). The last
    line may be half-written while the run appends to it: reading stops before a line that does not
    parse (it is read whole next time). A resumed run rewrites the file shorter: a count below
    `since` tells the reader to start again from 0."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        return [], 0
    records = []
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            return records, index
        if index >= since:
            records.append(record)
    return records, len(lines)


def progress(lines: list[str]) -> dict:
    """Step, total steps and ETA from the last progress line of a lorafit train log."""
    for line in reversed(lines):
        match = _PROGRESS.match(line.strip())
        if match:
            return {"step": int(match[1]), "max_steps": int(match[2]), "eta": match[3]}
    return {"step": None, "max_steps": None, "eta": None}


def complete_checkpoints(output_dir: Path) -> list[Path]:
    from lorafit.train.run import checkpoints_in

    return [p for p in checkpoints_in(output_dir) if not checkpoint_problems(p)]


def chat_adapter(output_dir: Path) -> Path | None:
    """The adapter to try: the final one, else the newest complete checkpoint's."""
    if (output_dir / "adapter_config.json").is_file():
        return output_dir
    for checkpoint in reversed(complete_checkpoints(output_dir)):
        if (checkpoint / "adapter_config.json").is_file():
            return checkpoint
    return None


def run_state(output_dir: Path, job: dict | None, running: bool) -> str:
    """preparing / training / stopping while the process lives; then finished, stopped or failed."""
    if running:
        job = job or {}
        if job.get("stop_requested"):
            return "stopping"
        return "training" if job.get("attempt_has_metrics") else "preparing"
    code = job.get("exit_code") if job else None
    if code == 0 or (code is None and (output_dir / "adapter_config.json").is_file()):
        return "finished"
    if code in STOPPED_CODES or (code is None and complete_checkpoints(output_dir)):
        return "stopped"
    return "failed"


class Runs:
    def __init__(self, runs_dir: Path, jobs: Jobs, state_dir: Path):
        self.runs_dir = Path(runs_dir)
        self.jobs = jobs
        self.registry = Path(state_dir) / "runs.txt"  # runs started by the page outside runs_dir

    # ---- actions -----------------------------------------------------------------------------

    def start(self, argv: list[str], output_dir: str, resumed: bool = False) -> dict:
        folder = Path(output_dir).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        previous = read_state(folder / RUN_STATE) or {}
        attempt = previous.get("attempt", 0) + 1 if resumed else 1
        self.jobs.start(["train", *argv], folder / RUN_STATE, folder / RUN_LOG,
                        {"argv": argv, "attempt": attempt, "output_dir": str(folder)})
        self._remember(folder)
        return self.describe(folder)

    def resume(self, output_dir: Path) -> dict:
        """The same flags again, continuing from the newest complete checkpoint."""
        from lorafit.train.run import resume_command

        job = read_state(output_dir / RUN_STATE)
        if not job:
            raise ValueError(f"{output_dir} was not started from this page: resume it with "
                             "lorafit train ... --resume_from_checkpoint auto")
        argv = shlex.split(resume_command(job["argv"], None))[2:]  # without "lorafit train"
        return self.start(argv, str(output_dir), resumed=True)

    def stop(self, output_dir: Path) -> bool:
        return self.jobs.send_signal(output_dir / RUN_STATE, signal.SIGTERM)

    # ---- reading -----------------------------------------------------------------------------

    def describe(self, output_dir: Path, since: int | None = None) -> dict:
        """Everything the page shows of a run; with `since`, the metrics records from that index."""
        output_dir = Path(output_dir)
        job = read_state(output_dir / RUN_STATE)
        running = self.jobs.running(output_dir / RUN_STATE)
        tail = log_tail(output_dir / RUN_LOG, 400)
        if job is not None:
            # This attempt is training once its log has a progress line after its own command line.
            starts = [i for i, line in enumerate(tail) if line.startswith("$ lorafit train")]
            job["attempt_has_metrics"] = any(_PROGRESS.match(line) for line in tail[starts[-1] if starts else 0:])
        state = run_state(output_dir, job, running)
        checkpoints = complete_checkpoints(output_dir)
        adapter = chat_adapter(output_dir)
        described = {
            "path": str(output_dir), "name": output_dir.name, "state": state, "running": running,
            "attempt": (job or {}).get("attempt", 1), "started": (job or {}).get("started"),
            "command": shlex.join(["lorafit", "train", *job["argv"]]) if job else None,
            "from_page": job is not None, **progress(tail),
            "checkpoint": str(checkpoints[-1]) if checkpoints else None,
            "resumable": state in ("stopped", "failed") and bool(checkpoints) and job is not None,
            "adapter": str(adapter) if adapter else None,
            "log_tail": tail[-20:],
            "message": _last_word(tail) if state in ("stopped", "failed") else None,
        }
        if since is not None:
            described["metrics"], described["metrics_count"] = read_metrics_from(output_dir / METRICS_FILE, since)
            described["metrics_from"] = since
        return described

    def listing(self) -> list[dict]:
        folders = {p.resolve() for p in self.runs_dir.iterdir() if p.is_dir() and _is_run(p)} \
            if self.runs_dir.is_dir() else set()
        folders |= {p for p in self._remembered() if p.is_dir()}
        described = [self.describe(folder) for folder in folders]
        return sorted(described, key=lambda run: -(run["started"] or _mtime(Path(run["path"]))))

    def _remember(self, folder: Path) -> None:
        if folder.parent == self.runs_dir.resolve() or folder in self._remembered():
            return
        self.registry.parent.mkdir(parents=True, exist_ok=True)
        with self.registry.open("a", encoding="utf-8") as handle:
            handle.write(f"{folder}\n")

    def _remembered(self) -> list[Path]:
        if not self.registry.is_file():
            return []
        return [Path(line) for line in self.registry.read_text(encoding="utf-8").splitlines() if line.strip()]


def _is_run(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in RUN_MARKERS)


def _mtime(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:
        return 0.0


def _last_word(tail: list[str]) -> str | None:
    """How the run ended: lorafit's closing line (an error, or the stop with its resume command),
    else the log's last line."""
    for line in reversed(tail):
        if line.startswith("lorafit train:") or "Error" in line.split(":", 1)[0]:
            return line
    return tail[-1] if tail else None
