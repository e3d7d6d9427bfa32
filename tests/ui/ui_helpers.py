"""Helpers for the page's tests: its server in a thread, and where Chromium is."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

BROWSER_ENV = "LORAFIT_UI_BROWSER"  # a Chromium binary, when it is not on PATH as chromium


def serve_ui(runs_dir: Path, api_key: str | None = None):
    """Start the page's server in a thread; returns (base url, UiState, stop function)."""
    import uvicorn

    from lorafit.ui.app import UiState, create_app

    ui = UiState(runs_dir)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(create_app(ui, api_key=api_key), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the page's server did not start"
        time.sleep(0.02)

    def stop():
        ui.jobs.stop_all(signal.SIGKILL)
        ui.chat.close()
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", ui, stop


def chromium_path() -> str | None:
    candidates = [os.environ.get(BROWSER_ENV), shutil.which("chromium"), shutil.which("chromium-browser"),
                  shutil.which("google-chrome")]
    return next((c for c in candidates if c and Path(c).exists()), None)
