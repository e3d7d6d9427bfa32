"""`lorafit` commands run as child processes of the page: training, merge, GGUF export.

The page never trains or exports in its own process: it starts `python -m lorafit <command> ...`,
sends its output to a log file, and keeps the job's state in a small JSON file beside it (argv,
pid, exit code). Because the state is on disk, a reloaded page, or a restarted `lorafit ui`, finds
the job again. Each child runs in its own session, so Ctrl-C in the terminal of `lorafit ui` does not
reach it: a run is stopped from the page (SIGTERM, lorafit's graceful stop) or with `kill`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from lorafit.errors import UserError

LOG_TAIL_BYTES = 64 * 1024


class JobRunning(UserError):
    """A job is already running in that folder."""


def lorafit_argv(*args: str) -> list[str]:
    """The child's command line: this Python, so the child runs the lorafit the page runs."""
    return [sys.executable, "-m", "lorafit", *args]


def read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_state(path: Path, state: dict) -> None:
    """Written whole or not at all: a reader never sees half a file."""
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(json.dumps(state, indent=1), encoding="utf-8")
    os.replace(staged, path)


def pid_is_lorafit(pid: int | None) -> bool:
    """Whether `pid` is alive and still a lorafit process (a pid can be reused after a restart)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # Linux: make sure the pid was not reused by another program
        try:
            return b"lorafit" in cmdline.read_bytes()
        except OSError:
            return False
    return True


def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a log, read from its end (a training log can be long)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - LOG_TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


class Jobs:
    """Starts jobs and records how they end; the children of this process are waited for here."""

    def __init__(self):
        self._children: dict[Path, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def start(self, args: list[str], state_path: Path, log_path: Path, state: dict | None = None) -> dict:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self.running(state_path):
                raise JobRunning(f"{state_path.parent} already has a run going: stop it first, or pick another "
                                 "--output_dir")
            with log_path.open("a", encoding="utf-8") as log:
                log.write(f"$ {shlex.join(['lorafit', *args])}\n")
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            with log_path.open("ab") as log:  # the child keeps its own descriptor
                child = subprocess.Popen(lorafit_argv(*args), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, env=env)
            state = {**(state or {}), "args": args, "pid": child.pid, "started": time.time(), "ended": None,
                     "exit_code": None, "stop_requested": False}
            write_state(state_path, state)
            self._children[state_path] = child
        threading.Thread(target=self._wait, args=(child, state_path), daemon=True,
                         name=f"wait-{child.pid}").start()
        return state

    def _wait(self, child: subprocess.Popen, state_path: Path) -> None:
        code = child.wait()
        with self._lock:
            state = read_state(state_path) or {}
            if state.get("pid") == child.pid:
                state.update(exit_code=code, ended=time.time())
                write_state(state_path, state)
            if self._children.get(state_path) is child:
                del self._children[state_path]

    def running(self, state_path: Path) -> bool:
        child = self._children.get(state_path)
        if child is not None:
            return child.poll() is None
        state = read_state(state_path)
        return bool(state) and state.get("exit_code") is None and pid_is_lorafit(state.get("pid"))

    def send_signal(self, state_path: Path, signum: int) -> bool:
        """Signal a running job; False when it is not running."""
        with self._lock:
            state = read_state(state_path)
            if not state or not self.running(state_path):
                return False
            os.kill(state["pid"], signum)
            state["stop_requested"] = True
            write_state(state_path, state)
            return True

    def stop_all(self, signum: int) -> None:
        """Signal every child of this process (tests; a page server shutting down keeps its runs)."""
        for child in list(self._children.values()):
            if child.poll() is None:
                child.send_signal(signum)
