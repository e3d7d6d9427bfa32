"""Helpers for the page's tests: its server in a thread, where Chromium is, and the train CLI's own error
message (what the page must show for the same mistake)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
from pathlib import Path

from lorafit import cli
from server_helpers import start_server

BROWSER_ENV = "LORAFIT_UI_BROWSER"  # a Chromium binary, when it is not on PATH as chromium


def serve_ui(runs_dir: Path, api_key: str | None = None):
    """Start the page's server in a thread; returns (base url, UiState, stop function)."""
    from lorafit.ui.app import UiState, create_app

    ui = UiState(runs_dir)
    url, stop_server = start_server(create_app(ui, api_key=api_key))

    def stop():
        ui.jobs.stop_all(signal.SIGKILL)
        ui.chat.close()
        stop_server()

    return url, ui, stop


def chromium_path() -> str | None:
    candidates = [os.environ.get(BROWSER_ENV), shutil.which("chromium"), shutil.which("chromium-browser"),
                  shutil.which("google-chrome")]
    return next((c for c in candidates if c and Path(c).exists()), None)


def cli_error(*argv: str) -> str:
    """The message `lorafit train ARGV` prints (after 'lorafit train: error: '), exit 2."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert cli.main(["train", *argv]) == 2
    text = stderr.getvalue()
    return text[text.index("lorafit train: error: ") + len("lorafit train: error: "):].rstrip("\n")
