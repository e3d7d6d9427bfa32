"""Output a log file can hold: no progress-bar redraws when stdout or stderr is not a terminal.

A tqdm bar redraws itself with carriage returns (and, nested, cursor escapes); in a log file (CI,
`nohup`, `make demo > log`, the web UI reading a run) each redraw stays as noise. So before any
command runs, `lorafit` calls `use_plain_output()`: off a terminal it switches off the bars of the
libraries lorafit drives (transformers' "Loading weights" and "Writing model shards", datasets' map
and save bars, huggingface_hub's downloads) through their environment switches, which they read
when imported and which the worker processes they start inherit, and through their own functions
when they are imported already. A switch the user set in the environment is left as it is.

lorafit's own progress goes through `progress`: a tqdm bar on a terminal, otherwise a plain line now
and then (`LineProgress`). Training prints one plain line per log instead (`train/callbacks.py`).
"""

from __future__ import annotations

import os
import sys
import time

# Read by huggingface_hub (and transformers, whose bars follow it) and by datasets when imported.
PROGRESS_BAR_SWITCHES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
LINE_INTERVAL_S = 30.0  # how often LineProgress reports


def output_is_terminal() -> bool:
    """True when both stdout and stderr are terminals, the only place a redrawn progress bar belongs."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))


def use_plain_output() -> bool:
    """Off a terminal, switch off every library progress bar (see the module docstring); returns
    whether it did."""
    if output_is_terminal():
        return False
    for name, value in PROGRESS_BAR_SWITCHES.items():
        os.environ.setdefault(name, value)
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    return True


class LineProgress:
    """tqdm's `update`/`close` for a log file: 'desc: 40/100 prompts (3.1/s, ETA 19s)' at most every
    `interval` seconds, and once at the end."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", file=None,
                 interval: float = LINE_INTERVAL_S):
        self.total, self.done, self.desc, self.unit = total, initial, desc, unit
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self._start = self._last = time.monotonic()
        self._initial = initial

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last >= self.interval and self.done < self.total:
            self._last = now
            self._write(now)

    def close(self) -> None:
        self._write(time.monotonic())

    def _write(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = (self.done - self._initial) / elapsed
        eta = f", ETA {round((self.total - self.done) / rate)}s" if 0 < rate and self.done < self.total else ""
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}s ({rate:.1f}/s{eta})", file=self.file, flush=True)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, initial: int = 0, desc: str = "", unit: str = "it", file=None):
    """A progress reporter: a tqdm bar on a terminal, `LineProgress` elsewhere."""
    if output_is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file if file is not None else sys.stderr)
    return LineProgress(total, initial, desc, unit, file)
