"""`lorafit serve`: an OpenAI-compatible chat-completions server (FastAPI on uvicorn).

    lorafit serve --adapter out/adapter --api_key secret
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Authorization: Bearer secret' \\
         -H 'Content-Type: application/json' \\
         -d '{"model": "adapter", "messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (with `"stream": true`: server-sent
events, as the OpenAI API sends them), `GET /health`. Prompts render through the training
template (`lorafit.data.render.render_prompt`).

Several adapters can share one server: `--adapter NAME=DIR` given more than once loads each on
the one base (`lorafit.lora.multi`), `/v1/models` lists the base and every NAME, and each request
picks one by its `model` field. Requests for different adapters still share one running batch:
each row applies its own adapter's A and B, and gets the greedy answer that adapter gives served
alone (`tests/infer/test_several_adapters.py`). Each adapter renders with the chat template saved
beside it.

Requests are answered together by continuous batching (`lorafit.infer.engine`): one engine thread
owns the model and runs decode steps; a request joins the running batch between two steps (up to
`--max_batch_size` rows) and leaves when it finishes, so a short answer never waits for a long one
and the event loop stays free to accept, check and reject requests. A client that goes away
(streaming or not) leaves the batch at the next step.

Every resource a request can claim is bounded (`lorafit.infer.serve_limits`): body size,
`max_tokens`, context, the queue (429 with `Retry-After` when full) and time (504, or an error
event at the end of a stream). Whatever a client sends, the answer is a 4xx with an OpenAI error
body, never a 5xx or a traceback in the log: `tests/reliability/test_server_*.py` checks this
under load.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
from starlette.requests import ClientDisconnect

from lorafit.errors import UserError
from lorafit.infer.engine import DEFAULT_MAX_BATCH_SIZE, BatchingEngine, Completion, GenerationRequest, QueueFullError
from lorafit.infer.loading import Answerer, LoadedModel, add_model_arguments, load_from_args
from lorafit.infer.openai_api import (
    APIError,
    ChatRequest,
    bad_request,
    check_context,
    chunk,
    completion_response,
    finish_reason,
    models_response,
    new_completion_id,
    parse_chat_request,
    queue_full,
    request_timed_out,
    usage,
)
from lorafit.infer.options import GenerationOptions, add_generation_arguments, options_from_args
from lorafit.infer.serve_limits import (
    RETRY_AFTER_SECONDS,
    ServeLimits,
    add_limit_arguments,
    limits_from_args,
    read_json_body,
)

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away": logged, never received


class ServedModel:
    """The loaded model behind the server: renders prompts and hands them to the batching engine,
    whose own thread runs decode steps until `close()`."""

    def __init__(self, loaded: LoadedModel, defaults: GenerationOptions, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 limits: ServeLimits | None = None):
        self.loaded = loaded
        self.defaults = defaults
        self.limits = (limits or ServeLimits()).validate(default_max_new_tokens=defaults.max_new_tokens)
        self.engine = BatchingEngine(loaded.model, loaded.tokenizer, stop_token_ids=loaded.stop_token_ids,
                                     pad_token_id=loaded.tokenizer.pad_token_id, max_batch_size=max_batch_size,
                                     max_queued=self.limits.max_queued_requests,
                                     max_model_len=self.limits.max_model_len)
        self.context_length = self.engine.context_length  # --max_model_len, else the model's
        self.engine_thread = self.engine.start()

    def answerers(self, served_model: str | None = None) -> dict[str, Answerer]:
        """Model id -> who answers it: the model as loaded (called `served_model` when given), then
        each named adapter."""
        table: dict[str, Answerer] = {}
        for index, answerer in enumerate(self.loaded.answerers):
            name = served_model if index == 0 and served_model else answerer.name
            if name in table:
                raise UserError(f"two served models would be called {name!r}: rename the adapter (NAME=DIR) "
                                "or pass --served_model_name")
            table[name] = dataclasses.replace(answerer, name=name)
        return table

    def render(self, chat: ChatRequest, answerer: Answerer | None = None) -> list[int]:
        """The prompt's token ids, checked to fit in the context with the answer asked for."""
        from lorafit.data.render import render_prompt

        tokenizer = (answerer or self.loaded.answerers[0]).tokenizer
        try:
            ids = render_prompt(tokenizer, chat.messages)
        except Exception as error:  # the template refused the conversation (e.g. roles out of order)
            raise bad_request(f"the chat template cannot render these messages: {str(error)[:300]}",
                              param="messages") from None
        check_context(len(ids), chat, self.context_length)
        return ids

    def submit(self, prompt: list[int], options: GenerationOptions, on_text=None,
               ignore_eos: bool = False, answerer: Answerer | None = None) -> GenerationRequest:
        """Queue one answer, by `answerer`'s adapter and with its stop tokens (default: the model as loaded)."""
        answerer = answerer or self.loaded.answerers[0]
        try:
            return self.engine.submit(prompt, options, on_text=on_text,
                                      stop_token_ids=() if ignore_eos else answerer.stop_token_ids,
                                      adapter_id=answerer.adapter_id, timeout=self.limits.timeout_seconds)
        except QueueFullError as full:
            raise queue_full(full.max_queued, RETRY_AFTER_SECONDS) from None

    def close(self) -> None:
        self.engine.close()
        self.engine_thread.join(timeout=30)


def create_app(served: ServedModel, served_model: str | None = None, api_key: str | None = None):
    """The HTTP app; `served_model` is the id of the model as loaded (default: its name), and each
    named adapter is served under its own name."""
    answerers = served.answerers(served_model)
    @asynccontextmanager
    async def lifespan(_app):
        yield
        served.close()  # after uvicorn has let the open responses finish

    app = FastAPI(title="lorafit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_left(_request, _error):  # while sending its body: nobody to answer
        return Response(status_code=CLIENT_CLOSED_REQUEST)

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
        return {"status": "ok", "model": next(iter(answerers)), "models": list(answerers)}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return models_response(list(answerers), started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_json_body(request, served.limits.max_body_bytes)
        chat = parse_chat_request(body, served.defaults, list(answerers), served.limits.max_new_tokens_limit)
        answerer = answerers[chat.model]
        prompt = await asyncio.to_thread(served.render, chat, answerer)  # a long prompt must not hold up the loop
        if chat.stream:
            return EngineStream(served, prompt, chat, answerer)
        completion = await complete_unless_client_leaves(served, request, prompt, chat.options,
                                                         ignore_eos=chat.ignore_eos, answerer=answerer)
        if completion is None or completion.finish_reason == "cancelled":  # the client left; nobody reads this
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if completion.finish_reason == "timeout":
            raise request_timed_out(served.limits.request_timeout)
        return completion_response(new_completion_id(), chat.model, completion)

    return app


async def complete_unless_client_leaves(served: ServedModel, request, prompt: list[int], options: GenerationOptions,
                                        *, ignore_eos: bool = False, poll_seconds: float = 0.25,
                                        answerer: Answerer | None = None) -> Completion | None:
    """A non-streaming answer; a client that disconnects leaves the batch at the next step (or never
    joins it, while it waits for room), so no step is spent on answers nobody reads."""
    job = served.submit(prompt, options, ignore_eos=ignore_eos, answerer=answerer)  # 429 here when the queue is full

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


class EngineStream(StreamingResponse):
    """Server-sent events for one request: a role chunk, content chunks as text is decoded, a finish
    chunk, [DONE]. The request is queued when this is built, so a full queue is still a 429; it
    leaves the batch when the response ends however it ends (client gone before or during the
    stream, server shutting down)."""

    def __init__(self, served: ServedModel, prompt: list[int], chat: ChatRequest, answerer: Answerer | None = None):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

        def send(kind: str, value) -> None:  # called from the engine's thread
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop closed (server shutting down)
                self.job.cancel()

        self.job = served.submit(prompt, chat.options, on_text=lambda text: send("text", text),
                                 ignore_eos=chat.ignore_eos, answerer=answerer)
        self.job.done.add_done_callback(lambda done: send("done", done))
        self.chat, self.timeout = chat, served.limits.request_timeout
        super().__init__(self.events_until_done(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()  # no-op once answered; otherwise its rows leave the batch at the next step

    async def events_until_done(self):
        chat, completion_id = self.chat, new_completion_id()
        yield sse(chunk(completion_id, chat.model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await self.events.get()
            if kind == "text":
                yield sse(chunk(completion_id, chat.model, {"content": value}))
                continue
            completion = value.result() if value.exception() is None else None
            if value.exception() is not None:  # reported in the stream; the HTTP status is already 200
                logger.error("generation failed", exc_info=value.exception())
                yield sse(APIError(500, f"generation failed: {value.exception()}", type_="server_error").body())
            elif completion is not None and completion.finish_reason == "timeout":
                yield sse(request_timed_out(self.timeout).body())
            elif completion is not None and completion.finish_reason != "cancelled":
                yield sse(chunk(completion_id, chat.model, finish=finish_reason(completion)))
                if chat.include_usage:
                    yield sse(chunk(completion_id, chat.model, usage_counts=usage(completion)))
            break
        yield "data: [DONE]\n\n"


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
                            "else the model's); with several named adapters, the base model's id (each adapter "
                            "is served under its NAME)")
    group.add_argument("--max_batch_size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                       help="the most requests decoded together; later ones join as answers finish "
                            f"(continuous batching; default: {DEFAULT_MAX_BATCH_SIZE}; 1 answers one at a time)")
    group.add_argument("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_limit_arguments(parser)
    add_generation_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    defaults = options_from_args(args)
    limits = limits_from_args(args)
    if args.max_batch_size < 1:
        raise UserError(f"--max_batch_size must be at least 1, got {args.max_batch_size}")
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api_key: anyone who can reach this port can use the model",
              file=sys.stderr)
    sock = bind(args.host, args.port)
    try:
        loaded = load_from_args(args)
        served = ServedModel(loaded, defaults, max_batch_size=args.max_batch_size, limits=limits)
    except BaseException:  # e.g. --max_model_len beyond the model: the port is free again at once
        sock.close()
        raise
    try:
        app = create_app(served, args.served_model_name, api_key=args.api_key)
    except BaseException:
        served.close()
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    names = ", ".join(f"'{name}'" for name in served.answerers(args.served_model_name))
    print(f"lorafit serve: model{'s' if len(served.loaded.answerers) > 1 else ''} {names} at http://{shown_host}:{port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0
