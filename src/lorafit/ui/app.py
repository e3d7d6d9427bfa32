"""The page's server: a FastAPI app serving `static/` (one HTML page, one script, one style sheet:
nothing from the internet) and a small JSON API the script calls.

    GET  /api/form                 the fields (from the train dataclasses), defaults, exports on offer
    POST /api/equivalent           the form as `lorafit train` flags, command line and YAML (or the errors)
    POST /api/config               a YAML file's text -> form values
    POST /api/upload?filename=F    a data file (the request body) saved under <runs_dir>/.lorafit-ui/uploads
    POST /api/detect               the data format(s) auto-detection finds, and the template in force
    POST /api/preview              `lorafit data inspect` as data: examples, trained spans, summary, bad records
    GET  /api/runs                 the runs in --runs_dir (and those the page started elsewhere)
    POST /api/runs                 check the form, then start `lorafit train` as a child process
    GET  /api/run?path=&since=N    one run: state, progress, metrics.jsonl records from N
    POST /api/run/stop, /resume    SIGTERM (graceful stop: a checkpoint), or the same flags from it
    POST /api/chat/load            load a run's adapter and its base for the chat
    POST /api/chat/{base,adapter}  an OpenAI chat-completions request; streamed as `lorafit serve` streams
    POST /api/export, GET too      merge / GGUF export of a run as a child process, and its state

A form problem is a 422 `{"errors": {field: message}}` whose messages are the CLI's; nothing is
started. With `--api_key`, every /api request needs `Authorization: Bearer KEY` (the page reads
the key from the `#key=` part of its address, which browsers never send to the server).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from lorafit.errors import UserError
from lorafit.infer.openai_api import APIError, parse_chat_request
from lorafit.infer.serve import EngineStream, complete_unless_client_leaves
from lorafit.infer.serve_limits import read_json_body
from lorafit.models import EMBEDDED_MODEL
from lorafit.ui import checks, form
from lorafit.ui.chat import ChatModels
from lorafit.ui.command import DEFAULT_MAX_UPLOAD_MB
from lorafit.ui.exports import available_exports, describe_export, start_export
from lorafit.ui.jobs import JobRunning, Jobs
from lorafit.ui.preview import DEFAULT_LIMIT, TokenizerCache, preview
from lorafit.ui.runs import Runs

STATIC = Path(__file__).parent / "static"
STATE_FOLDER = ".lorafit-ui"


class UploadTooLargeError(UserError):
    status = 413
MAX_PREVIEW = 50


class UiState:
    """What the server holds: the runs folder, child jobs, a tokenizer cache and the chat models."""

    def __init__(self, runs_dir: str | Path, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
        self.runs_dir = Path(runs_dir)
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.state_dir = self.runs_dir / STATE_FOLDER
        self.jobs = Jobs()
        self.runs = Runs(self.runs_dir, self.jobs, self.state_dir)
        self.tokenizers = TokenizerCache()
        self.chat = ChatModels()
        self.data_lock = threading.Lock()  # one data build at a time (they share the on-disk cache)

    def check_and_preview(self, values: dict, limit: int = DEFAULT_LIMIT, for_start: bool = False):
        """(argv, config, preview) of the form, or a FormError: the checks `lorafit train` makes."""
        argv, config = checks.parse_form(values)
        if for_start:
            checks.check_can_start(config)
        with self.data_lock:
            shown = preview(config, self.tokenizers, self.state_dir / "preview", limit)
        return argv, config, shown

    def start_run(self, values: dict) -> dict:
        argv, config, _ = self.check_and_preview(values, limit=1, for_start=True)
        try:
            return self.runs.start(argv, config.training.output_dir)
        except JobRunning as error:
            raise form.FormError({"output_dir": str(error)}) from None


def form_errors(error: form.FormError) -> JSONResponse:
    body = {"errors": error.errors}
    if getattr(error, "bad_records", None):
        body["bad_records"] = error.bad_records
    return JSONResponse(body, status_code=422)


def create_app(ui: UiState, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="lorafit ui", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(form.FormError)
    async def form_error(_request, error: form.FormError):
        return form_errors(error)

    @app.exception_handler(UserError)
    async def user_error(_request, error: UserError):
        return JSONResponse({"error": str(error)}, status_code=getattr(error, "status", 400))

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/api/"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return JSONResponse({"error": "this page needs its key: open it as http://HOST:PORT/#key=KEY"},
                                    status_code=401)
        return await call_next(request)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/form")
    async def form_schema():
        return {"fields": [f.to_json() for f in form.FIELDS], "sections": list(form.MAIN_FIELDS),
                "values": form.default_values(), "embedded_model": EMBEDDED_MODEL,
                "runs_dir": str(ui.runs_dir), "exports": available_exports(), "chat": ui.chat.describe()}

    @app.post("/api/equivalent")
    async def equivalent(request: Request):
        values = (await request.json()).get("values", {})
        argv, config = await asyncio.to_thread(checks.parse_form, values)
        return {"argv": argv, "command": form.command_line(argv), "yaml": form.config_yaml(config)}

    @app.post("/api/config")
    async def load_config(request: Request):
        text = (await request.body()).decode("utf-8", errors="replace")
        return {"values": await asyncio.to_thread(form.values_from_yaml, text)}

    @app.post("/api/upload")
    async def upload(request: Request, filename: str = "data.jsonl"):
        """Saved whole or not at all (a partial file beside it, renamed at the end), up to the limit."""
        folder = ui.state_dir / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / _safe_name(filename)
        partial = target.with_name(f".{target.name}.partial")
        received = 0
        try:
            with partial.open("wb") as handle:
                async for piece in request.stream():
                    received += len(piece)
                    if received > ui.max_upload_bytes:
                        raise UploadTooLargeError(f"{target.name} is larger than the upload limit of "
                                        f"{ui.max_upload_bytes / 2**20:g} MiB: give its path on this machine "
                                        "instead, or start lorafit ui with a larger --max_upload_mb")
                    handle.write(piece)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return {"path": str(target)}

    @app.post("/api/detect")
    async def detect(request: Request):
        values = (await request.json()).get("values", {})
        return await asyncio.to_thread(_detect, values)

    @app.post("/api/preview")
    async def data_preview(request: Request):
        body = await request.json()
        limit = max(1, min(int(body.get("limit") or DEFAULT_LIMIT), MAX_PREVIEW))
        _, _, shown = await asyncio.to_thread(ui.check_and_preview, body.get("values", {}), limit)
        return shown

    @app.get("/api/runs")
    async def list_runs():
        return {"runs": await asyncio.to_thread(ui.runs.listing)}

    @app.post("/api/runs")
    async def start_run(request: Request):
        values = (await request.json()).get("values", {})
        return await asyncio.to_thread(ui.start_run, values)

    @app.get("/api/run")
    async def run_status(path: str, since: int | None = None):
        return await asyncio.to_thread(ui.runs.describe, _run_dir(path), since)

    @app.post("/api/run/stop")
    async def stop_run(request: Request):
        folder = _run_dir((await request.json()).get("path", ""))
        if not ui.runs.stop(folder):
            raise UserError(f"{folder} is not running")
        return ui.runs.describe(folder)

    @app.post("/api/run/resume")
    async def resume_run(request: Request):
        folder = _run_dir((await request.json()).get("path", ""))
        try:
            return await asyncio.to_thread(ui.runs.resume, folder)
        except ValueError as error:
            raise UserError(str(error)) from None

    @app.post("/api/chat/load")
    async def chat_load(request: Request):
        adapter = (await request.json()).get("adapter") or ""
        return await asyncio.to_thread(ui.chat.load, adapter)

    @app.post("/api/chat/{slot}")
    async def chat(slot: str, request: Request):
        served, answerer = ui.chat.served(slot)
        body = await read_json_body(request, served.limits.max_body_bytes)
        chat_request = parse_chat_request(body, served.defaults, slot, served.limits.max_new_tokens_limit)
        prompt = await asyncio.to_thread(served.render, chat_request, answerer)
        if chat_request.stream:
            return EngineStream(served, prompt, chat_request, answerer)
        completion = await complete_unless_client_leaves(served, request, prompt, chat_request.options,
                                                         answerer=answerer)
        return {"text": completion.text if completion else ""}

    @app.post("/api/export")
    async def export(request: Request):
        body = await request.json()
        return await asyncio.to_thread(start_export, ui.jobs, _run_dir(body.get("path", "")), body.get("kind", ""))

    @app.get("/api/export")
    async def export_status(path: str, kind: str):
        return describe_export(ui.jobs, _run_dir(path), kind)

    return app


def _detect(values: dict) -> dict:
    """The data format(s) `--data_format auto` will see and the template in force, without tokenizing."""
    from lorafit.data.formats import FormatOptions, resolve_files
    from lorafit.ui.preview import detected_formats, template_description

    _, config = checks.parse_form(values)
    data = config.data
    try:
        files = resolve_files(data.train_file, "--train_file") if data.train_file else []
    except UserError as error:
        raise checks.form_error(error, "train_file") from None
    return {"formats": detected_formats(files, FormatOptions.from_args(data)),
            "template": template_description(data.template_choice)}


def _run_dir(path: str) -> Path:
    folder = Path(path).expanduser()
    if not path or not folder.is_dir():
        raise UserError(f"no run folder {path!r}")
    return folder.resolve()


def _safe_name(filename: str) -> str:
    """The uploaded file's own name, without any folder part or odd characters."""
    name = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in Path(filename).name).lstrip(".")
    return name or "data.jsonl"
