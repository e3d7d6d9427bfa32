"""Fixtures for the web page: the page's server on a free port of 127.0.0.1 (a real uvicorn in a
thread, as tests/infer/test_serve.py runs `lorafit serve`), small data files, and headless Chromium
driven by Playwright (skipped, with the reason, where either is missing)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorafit.demo import DEFAULT_AUTHOR, DEFAULT_NAME, TRAIN_RESOURCE, identity_records, write_jsonl
from ui_helpers import BROWSER_ENV, chromium_path, serve_ui

SCREENSHOTS_ENV = "LORAFIT_UI_SCREENSHOTS"  # a folder: the browser tests save ui-<state>.png there


@pytest.fixture(scope="session")
def ui_data(tmp_path_factory) -> dict[str, Path]:
    """good.jsonl: 16 identity records; bad.jsonl: the same with a broken line 3 and a wrong type on line 5."""
    folder = tmp_path_factory.mktemp("ui-data")
    records = identity_records(TRAIN_RESOURCE, DEFAULT_NAME, DEFAULT_AUTHOR)[:16]
    good = write_jsonl(records, folder / "good.jsonl")
    lines = [json.dumps(r) for r in records[:6]]
    lines[2] = '{"prompt": "Who are you?", "response": '
    lines[4] = json.dumps({"prompt": "Hi", "response": 42})
    bad = folder / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"good": good, "bad": bad}


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    url, ui, stop = serve_ui(tmp_path_factory.mktemp("ui-runs"))
    yield url, ui
    stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                   "(pip install playwright; make install does it)")
    executable = chromium_path()
    if executable is None:
        pytest.skip(f"no Chromium to drive: install Debian's chromium package (apt-get install chromium; "
                    f".ci/run does it) or set {BROWSER_ENV}")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def screenshot():
    """screenshot(page, name): docs/images/ui-<name>.png, only when LORAFIT_UI_SCREENSHOTS names a folder."""
    folder = os.environ.get(SCREENSHOTS_ENV)

    def take(page, name: str) -> None:
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(folder) / f"ui-{name}.png"), full_page=True)

    return take
