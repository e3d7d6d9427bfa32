"""`lorafit serve`: an OpenAI-compatible chat-completions server (FastAPI on uvicorn).

    lorafit serve --adapter out/adapter --api_key secret
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Authorization: Bearer secret' \\
         -d '{"model": "adapter", "messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (with `"stream": true`: server-sent
events, as the OpenAI API sends them), `GET /health`. Prompts render through the training
template (`lorafit.data.render.render_prompt`).

One model, one worker thread: requests wait their turn in the worker's queue, so two answers are
never interleaved and the model is never entered twice at once; the event loop stays free to
accept, check and reject requests meanwhile. A streaming client that goes away stops its
generation at the next token.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# Module level, not inside create_app: FastAPI resolves the `Request` annotation by name.
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lorafit.errors import UserError
from lorafit.infer.generate import Completion, context_length, generate
from lorafit.infer.loading import LoadedModel, add_model_arguments, load_from_args
from lorafit.infer.openai_api import (
    APIError,
    ChatRequest,
    bad_request,
    chunk,
    completion_response,
    finish_reason,
    models_response,
    new_completion_id,
    parse_chat_request,
    usage,
)
from lorafit.infer.options import GenerationOptions, GenerationOptionsError, add_generation_arguments, options_from_args

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20


class Engine:
    """The model behind a single worker thread: jobs run one at a time, in arrival order."""

    def __init__(self, loaded: LoadedModel, defaults: GenerationOptions):
        self.loaded = loaded
        self.defaults = defaults
        self.context_length = context_length(loaded.model)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafit-generate")

    def render(self, messages: list[dict]) -> list[int]:
        from lorafit.data.render import render_prompt

        try:
            ids = render_prompt(self.loaded.tokenizer, messages)
        except Exception as error:  # the template refused the conversation (e.g. roles out of order)
            raise bad_request(f"the chat template cannot render these messages: {error}", param="messages") from None
        if self.context_length is not None and len(ids) >= self.context_length:
            raise bad_request(
                f"the messages have {len(ids)} tokens; this model's maximum context length is {self.context_length}",
                param="messages", code="context_length_exceeded",
            )
        return ids

    def complete(self, prompt: list[int], options: GenerationOptions, on_text=None) -> Completion:
        (completion,) = generate(
            self.loaded.model, [prompt], options, stop_token_ids=self.loaded.stop_token_ids,
            pad_token_id=self.loaded.tokenizer.pad_token_id, tokenizer=self.loaded.tokenizer,
            on_text=on_text,
        )
        return completion

    async def run(self, job):
        return await asyncio.get_running_loop().run_in_executor(self.worker, job)


def create_app(engine: Engine, served_model: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    app = FastAPI(title="lorafit", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):  # unknown route, wrong method
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(APIError(error.status_code, str(error.detail), code=code).body(),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request, error: Exception):
        logger.exception("request failed")
        body = APIError(500, f"internal error: {type(error).__name__}: {error}", type_="server_error").body()
        return JSONResponse(body, status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served_model}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return models_response(served_model, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_json(request, max_body_bytes)
        try:
            chat = parse_chat_request(body, engine.defaults, served_model)
        except GenerationOptionsError as error:
            raise bad_request(str(error), param=error.option) from None
        prompt = engine.render(chat.messages)
        if chat.stream:
            return StreamingResponse(stream_events(engine, prompt, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        completion = await complete_unless_client_leaves(engine, request, prompt, chat.options)
        if completion is None:  # the client left before its turn; nobody reads this answer
            return Response(status_code=499)
        return completion_response(new_completion_id(), chat.model, completion)

    return app


async def complete_unless_client_leaves(engine: Engine, request, prompt: list[int], options: GenerationOptions,
                                        poll_seconds: float = 0.25) -> Completion | None:
    """A non-streaming answer; a client that disconnects stops its generation at the next token (or
    before it starts, while it waits in the queue), so the worker is not held by answers nobody reads."""
    client_gone = threading.Event()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(poll_seconds)
        client_gone.set()

    def job() -> Completion | None:
        if client_gone.is_set():
            return None
        return engine.complete(prompt, options, lambda _row, _text: not client_gone.is_set())

    watcher = asyncio.create_task(watch())
    try:
        return await engine.run(job)
    finally:
        client_gone.set()
        watcher.cancel()


async def read_json(request, limit: int):
    """The request body as JSON, refusing bodies over `limit` bytes without reading them whole."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad_request(f"We could not parse the JSON body of your request: {error}") from None
    except RecursionError:
        raise bad_request("We could not parse the JSON body of your request: it is nested too deeply") from None


async def stream_events(engine: Engine, prompt: list[int], chat: ChatRequest):
    """Server-sent events: a role chunk, content chunks as text is decoded, a finish chunk, [DONE]."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    client_gone = threading.Event()

    def send(kind: str, value) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop closed (server shutting down)
            client_gone.set()

    def on_text(_row: int, text: str) -> bool:
        send("text", text)
        return not client_gone.is_set()  # False ends this generation

    def job() -> None:
        if client_gone.is_set():  # it left while waiting in the queue
            return
        try:
            send("done", engine.complete(prompt, chat.options, on_text))
        except Exception as error:  # reported in the stream; the HTTP status is already 200
            logger.exception("generation failed")
            send("error", error)

    completion_id = new_completion_id()
    engine.worker.submit(job)
    try:
        yield sse(chunk(completion_id, chat.model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield sse(chunk(completion_id, chat.model, {"content": value}))
            elif kind == "error":
                yield sse(APIError(500, f"generation failed: {value}", type_="server_error").body())
                break
            else:
                yield sse(chunk(completion_id, chat.model, finish=finish_reason(value)))
                if chat.include_usage:
                    yield sse(chunk(completion_id, chat.model, usage_counts=usage(value)))
                break
        yield "data: [DONE]\n\n"
    finally:
        client_gone.set()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def bind(host: str, port: int) -> socket.socket:
    """Open the listening socket now, so a taken port fails before the model loads."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 (any free port) and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port or --host") from None
    sock.listen(128)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafit serve",
        description="OpenAI-compatible HTTP server: GET /v1/models, POST /v1/chat/completions (streaming too).",
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    group.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    group.add_argument("--api_key", default=os.environ.get("LORAFIT_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' on every /v1 request (default: $LORAFIT_API_KEY, else none)")
    group.add_argument("--served_model_name", default=None,
                       help="the model id clients send and /v1/models lists (default: the adapter folder's name, "
                            "else the model's)")
    group.add_argument("--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                       help=f"largest request body accepted (default: {DEFAULT_MAX_BODY_BYTES})")
    group.add_argument("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_generation_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    defaults = options_from_args(args)
    if args.max_body_bytes < 1024:
        raise UserError(f"--max_body_bytes must be at least 1024, got {args.max_body_bytes}")
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api_key: anyone who can reach this port can use the model",
              file=sys.stderr)
    sock = bind(args.host, args.port)
    loaded = load_from_args(args)
    served_model = args.served_model_name or loaded.name
    app = create_app(Engine(loaded, defaults), served_model, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"lorafit serve: model '{served_model}' at http://{shown_host}:{port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0
