"""What `lorafit serve` accepts, and for how long: body size, answer length, context, queue, time.

A server open to many clients must bound every resource a request can claim, and say which bound
was hit (as vLLM and TGI do), so one client cannot starve the others or exhaust memory:

- `--max_body_bytes`: larger bodies get 413, read no further than the limit;
- `--max_new_tokens_limit`: a `max_tokens` above it gets 400 (`integer_above_max_value`);
- `--max_model_len`: a prompt, plus the `max_tokens` it asks for, beyond it gets 400
  (`context_length_exceeded`); a request without `max_tokens` gets what fits;
- `--max_queued_requests`: with `--max_batch_size` rows decoding and this many waiting, a new
  request gets 429 with a `Retry-After` header, so the queue cannot grow without limit;
- `--request_timeout`: a request still unfinished this long after it was queued leaves the batch
  (its rows are freed) and gets 504, or an error event at the end of its stream.

`ServeLimits` holds them, checked once at the command line (`UserError`, exit code 2).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from email.message import Message

from lorafit.errors import UserError
from lorafit.infer.openai_api import APIError, decode_json_body

RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = field(default=1 << 20, metadata={
        "help": "largest request body accepted, at least 1024; larger ones get 413"})
    max_new_tokens_limit: int = field(default=4096, metadata={
        "help": "the most new tokens a request may ask for (max_tokens / max_completion_tokens); more gets 400"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "context length allowed per request, prompt plus answer, at most the model's; longer gets 400 "
                "(default: the model's context length)"})
    max_queued_requests: int = field(default=32, metadata={
        "help": "the most requests waiting for a batch row; when --max_batch_size are decoding and this many "
                "wait, new ones get 429 with Retry-After (0: no waiting, only free rows)"})
    request_timeout: float = field(default=600, metadata={
        "help": "seconds a request may take from being queued to its last token; after that it is stopped, "
                "its rows freed, and it gets 504 (streaming: an error event); 0: no limit"})

    def validate(self, default_max_new_tokens: int | None = None) -> "ServeLimits":
        """Check every range once, at the command line; errors name the flag."""
        def integer(name, value, least):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"--{name} must be an integer of at least {least}, got {value!r}")

        integer("max_body_bytes", self.max_body_bytes, 1024)
        integer("max_new_tokens_limit", self.max_new_tokens_limit, 1)
        if self.max_model_len is not None:
            integer("max_model_len", self.max_model_len, 2)
        integer("max_queued_requests", self.max_queued_requests, 0)
        timeout = self.request_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf"):
            raise UserError(f"--request_timeout must be a number of seconds, 0 or more (0: no limit), got {timeout!r}")
        if default_max_new_tokens is not None and default_max_new_tokens > self.max_new_tokens_limit:
            raise UserError(f"--max_new_tokens {default_max_new_tokens} is more than --max_new_tokens_limit "
                            f"{self.max_new_tokens_limit}: lower it or raise the limit")
        return self

    @property
    def timeout_seconds(self) -> float | None:
        return self.request_timeout or None


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits (what one request may claim; see docs/infer.md)")
    kinds = {"max_body_bytes": (int, "BYTES"), "max_new_tokens_limit": (int, "TOKENS"),
             "max_model_len": (int, "TOKENS"), "max_queued_requests": (int, "N"), "request_timeout": (float, "SECONDS")}
    for limit in fields(ServeLimits):
        kind, metavar = kinds[limit.name]
        shown = "" if limit.default is None else f" (default: {limit.default})"
        group.add_argument(f"--{limit.name}", type=kind, default=limit.default, metavar=metavar,
                           help=limit.metadata["help"] + shown)


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    limits = ServeLimits(**{limit.name: getattr(args, limit.name) for limit in fields(ServeLimits)})
    return limits.validate(default_max_new_tokens=args.max_new_tokens)


async def read_json_body(request, limit: int):
    """The request body as JSON: a JSON content type (or none), no more than `limit` bytes (read
    no further), then `decode_json_body`'s checks."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        raise APIError(415, f"Unsupported Content-Type {content_type[:80]!r}: send the body as JSON with "
                            "'Content-Type: application/json'.", code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return decode_json_body(bytes(body))


def _is_json(content_type: str) -> bool:
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))
