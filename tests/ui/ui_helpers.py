"""Helpers for the page's tests: its server in a thread, and where Chromium is."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

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
