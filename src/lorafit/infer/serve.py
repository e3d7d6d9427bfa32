"""`lorafit serve`: an OpenAI-compatible chat-completions server (FastAPI on uvicorn).

    lorafit serve --adapter out/adapter --api_key secret
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Authorization: Bearer secret' \\
         -d '{"model": "adapter", "messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (with `"stream": true`: server-sent
events, as the OpenAI API sends them), `GET /health`. Prompts render through the training
template (`lorafit.data.render.render_prompt`).

Requests are answered together by continuous batching (`lorafit.infer.engine`): one engine thread
owns the model and runs decode steps; a request joins the running batch between two steps (up to
`--max_batch_size` rows) and leaves when it finishes, so a short answer never waits for a long one
and the event loop stays free to accept, check and reject requests. A client that goes away
(streaming or not) leaves the batch at the next step.
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
import time
from contextlib import asynccontextmanager

# Module level, not inside create_app: FastAPI resolves the `Request` annotation by name.
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lorafit.errors import UserError
from lorafit.infer.engine import (
    DEFAULT_MAX_BATCH_SIZE,
    BatchingEngine,
    Completion,
    GenerationRequest,
    context_length,
)
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


class ServedModel:
    """The loaded model behind the server: renders prompts and hands them to the batching engine,
    whose own thread runs decode steps until `close()`."""

    def __init__(self, loaded: LoadedModel, defaults: GenerationOptions, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE):
        self.loaded = loaded
        self.defaults = defaults
        self.context_length = context_length(loaded.model)
        self.engine = BatchingEngine(loaded.model, loaded.tokenizer, stop_token_ids=loaded.stop_token_ids,
                                     pad_token_id=loaded.tokenizer.pad_token_id, max_batch_size=max_batch_size)
        self.engine_thread = self.engine.start()

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

    def submit(self, prompt: list[int], options: GenerationOptions, on_text=None,
               ignore_eos: bool = False) -> GenerationRequest:
        return self.engine.submit(prompt, options, on_text=on_text, stop_token_ids=() if ignore_eos else None)

    def close(self) -> None:
        self.engine.close()
        self.engine_thread.join(timeout=30)


def create_app(served: ServedModel, served_model: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    @asynccontextmanager
    async def lifespan(_app):
        yield
        served.close()  # after uvicorn has let the open responses finish

    app = FastAPI(title="lorafit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
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
            chat = parse_chat_request(body, served.defaults, served_model)
        except GenerationOptionsError as error:
            raise bad_request(str(error), param=error.option) from None
        prompt = served.render(chat.messages)
        if chat.stream:
            return StreamingResponse(stream_events(served, prompt, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        completion = await complete_unless_client_leaves(served, request, prompt, chat.options,
                                                         ignore_eos=chat.ignore_eos)
        if completion is None:  # the client left before its turn; nobody reads this answer
            return Response(status_code=499)
        return completion_response(new_completion_id(), chat.model, completion)

    return app


async def complete_unless_client_leaves(served: ServedModel, request, prompt: list[int], options: GenerationOptions,
                                        *, ignore_eos: bool = False, poll_seconds: float = 0.25) -> Completion | None:
    """A non-streaming answer; a client that disconnects leaves the batch at the next step (or never
    joins it, while it waits for room), so no step is spent on answers nobody reads."""
    job = served.submit(prompt, options, ignore_eos=ignore_eos)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(poll_seconds)
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await asyncio.wrap_future(job.done)
    finally:
        job.cancel()  # no-op once answered; otherwise this handler was cancelled: stop the row
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


async def stream_events(served: ServedModel, prompt: list[int], chat: ChatRequest):
    """Server-sent events: a role chunk, content chunks as text is decoded, a finish chunk, [DONE]."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def send(kind: str, value) -> None:  # called from the engine's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop closed (server shutting down)
            job.cancel()

    job = served.submit(prompt, chat.options, on_text=lambda text: send("text", text), ignore_eos=chat.ignore_eos)
    job.done.add_done_callback(lambda done: send("done", done))
    completion_id = new_completion_id()
    try:
        yield sse(chunk(completion_id, chat.model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield sse(chunk(completion_id, chat.model, {"content": value}))
                continue
            error = value.exception()
            if error is not None:  # reported in the stream; the HTTP status is already 200
                logger.error("generation failed", exc_info=error)
                yield sse(APIError(500, f"generation failed: {error}", type_="server_error").body())
            elif value.result() is not None:
                completion = value.result()
                yield sse(chunk(completion_id, chat.model, finish=finish_reason(completion)))
                if chat.include_usage:
                    yield sse(chunk(completion_id, chat.model, usage_counts=usage(completion)))
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a client that went away leaves the batch at the next step


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
        description="OpenAI-compatible HTTP server: GET /v1/models, POST /v1/chat/completions (streaming too). "
                    "Concurrent requests are decoded together (continuous batching, up to --max_batch_size); "
                    "the generation flags are the defaults for fields a request leaves out.",
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
    group.add_argument("--max_batch_size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                       help="the most requests decoded together; later ones join as answers finish "
                            f"(continuous batching; default: {DEFAULT_MAX_BATCH_SIZE}; 1 answers one at a time)")
    group.add_argument("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_generation_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    defaults = options_from_args(args)
    if args.max_body_bytes < 1024:
        raise UserError(f"--max_body_bytes must be at least 1024, got {args.max_body_bytes}")
    if args.max_batch_size < 1:
        raise UserError(f"--max_batch_size must be at least 1, got {args.max_batch_size}")
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api_key: anyone who can reach this port can use the model",
              file=sys.stderr)
    sock = bind(args.host, args.port)
    loaded = load_from_args(args)
    served_model = args.served_model_name or loaded.name
    served = ServedModel(loaded, defaults, max_batch_size=args.max_batch_size)
    app = create_app(served, served_model, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"lorafit serve: model '{served_model}' at http://{shown_host}:{port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0
