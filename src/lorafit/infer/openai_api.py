"""The OpenAI chat-completions protocol: request checking and response shapes, free of any server.

Every problem with a request becomes an `APIError` with the status and the error body OpenAI
clients expect (`{"error": {"message", "type", "param", "code"}}`), naming the offending field.
Besides the OpenAI fields we accept `top_k` and `repetition_penalty` (as vLLM does; the `openai`
client sends them through `extra_body`), and, for benchmarks, vLLM's `ignore_eos` (the answer runs
on past end-of-turn tokens to `max_tokens`, so every answer has the same length).

Whatever a client sends, `decode_json_body` and `parse_chat_request` either return or raise an
`APIError` with a 4xx status: `tests/reliability/test_server_requests.py` fuzzes both. Values
quoted back in error messages are cut to `SHOWN_CHARS`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass

from lorafit.infer.engine import Completion
from lorafit.infer.options import GenerationOptions, GenerationOptionsError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_STOP_STRINGS = 4
SHOWN_CHARS = 80


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def shown(value) -> str:
    """`repr(value)`, cut short: enough to recognise it, never a megabyte quoted back."""
    text = json.dumps(value, ensure_ascii=True) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def queue_full(max_queued: int, retry_after: int) -> APIError:
    return APIError(429, f"The server is busy: every batch row is taken and {max_queued} requests are already "
                         f"waiting (--max_queued_requests). Retry after {retry_after} s.",
                    code="queue_full", type_="rate_limit_error", headers={"Retry-After": str(retry_after)})


def request_timed_out(seconds: float) -> APIError:
    return APIError(504, f"The request did not finish within {seconds:g} s (--request_timeout) and was stopped; "
                         "ask for fewer tokens (max_tokens) or try again when the server is less busy.",
                    code="request_timeout", type_="timeout_error")


def decode_json_body(raw: bytes):
    """The request body as a JSON value: strict JSON (no NaN or Infinity), valid UTF-8, no lone
    surrogate escapes (they cannot be tokenized or sent back), nested no deeper than Python parses."""
    def refuse_constant(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=refuse_constant)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\\ud800") fails here
    except RecursionError:
        raise bad_request("We could not parse the JSON body of your request: it is nested too deeply") from None
    except UnicodeEncodeError:
        raise bad_request("We could not parse the JSON body of your request: a string holds a lone "
                          "surrogate escape (\\ud800-\\udfff), which is not text") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError, huge integers, NaN, bad bytes
        raise bad_request(f"We could not parse the JSON body of your request: {str(error)[:200]}") from None
    return body


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    options: GenerationOptions
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # benchmark-only extension: do not stop at end-of-turn tokens
    max_tokens: int | None = None  # as the request asked (None: the server's default, cut to what fits)
    max_tokens_param: str = "max_tokens"  # or "max_completion_tokens": the field it came in


def parse_chat_request(body, defaults: GenerationOptions, served_model: str | Collection[str],
                       max_new_tokens_limit: int | None = None) -> ChatRequest:
    """Check a decoded JSON body and turn it into messages and generation options; `max_tokens`
    above `max_new_tokens_limit` is refused."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter (a string)", param="model")
    served = (served_model,) if isinstance(served_model, str) else tuple(served_model)
    if model not in served:
        listed = ", ".join(f"`{name}`" for name in served)
        raise APIError(404, f"The model {shown(model)} does not exist. This server serves {listed}.",
                       param="model", code="model_not_found")
    messages = _parse_messages(body.get("messages"))
    _refuse_unsupported(body)
    stream = _optional(body, "stream", bool, False)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    include_usage = _optional(stream_options, "include_usage", bool, False, prefix="stream_options.")
    max_tokens, param = _parse_max_tokens(body, max_new_tokens_limit)
    try:
        options = _parse_options(body, defaults).updated(max_new_tokens=max_tokens)
    except GenerationOptionsError as error:  # a range only GenerationOptions knows (e.g. seed)
        raise bad_request(str(error).removeprefix("--"), param=error.option) from None
    ignore_eos = _optional(body, "ignore_eos", bool, False)
    return ChatRequest(model, messages, options, stream, include_usage and stream, ignore_eos, max_tokens, param)


def check_context(prompt_tokens: int, chat: ChatRequest, max_model_len: int | None) -> None:
    """The prompt, and the answer it asked for, must fit in the context (vLLM's messages). A request
    that leaves `max_tokens` out gets what fits, up to the server's default."""
    if max_model_len is None:
        return
    if prompt_tokens >= max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, your messages "
                          f"resulted in {prompt_tokens} tokens, which leaves no room for a completion. Please "
                          "reduce the length of the messages.", param="messages", code="context_length_exceeded")
    if chat.max_tokens is not None and prompt_tokens + chat.max_tokens > max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                          f"{prompt_tokens + chat.max_tokens} tokens ({prompt_tokens} in the messages, "
                          f"{chat.max_tokens} in the completion). Please reduce the length of the messages or "
                          "completion.", param=chat.max_tokens_param, code="context_length_exceeded")


def _parse_messages(messages) -> list[dict]:
    if messages is None:
        raise bad_request("you must provide a messages parameter", param="messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array", param="messages")
    parsed = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object", param=param)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(f"{param}.role must be one of {', '.join(ROLES)}; got {shown(role)}",
                              param=f"{param}.role")
        parsed.append({"role": ROLES[role], "content": _text_content(message.get("content"), f"{param}.content")})
    return parsed


def _text_content(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{param}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                                  param=param)
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{param} must be a string or an array of text parts", param=param)


def _refuse_unsupported(body: dict) -> None:
    """Fields that would change the answer's meaning if silently ignored."""
    n = body.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise bad_request("only n=1 is supported", param="n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_request(f"{name} are not supported by this server", param=name)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad_request("logprobs are not supported by this server", param="logprobs")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_request("only the text response_format is supported", param="response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _optional(body, name, float, 0.0)
        if not -2 <= value <= 2:
            raise bad_request(f"{name} must be between -2 and 2; got {value}", param=name)
        if value != 0:
            raise bad_request(f"{name} is not supported; use repetition_penalty (e.g. 1.1) instead", param=name)


def _parse_max_tokens(body: dict, limit: int | None) -> tuple[int | None, str]:
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(param)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise bad_request(f"{param} must be a positive integer; got {shown(max_tokens)}", param=param)
    if max_tokens is not None and limit is not None and max_tokens > limit:
        raise bad_request(f"Invalid '{param}': integer above maximum value. Expected a value <= {limit} "
                          f"(--max_new_tokens_limit), but got {shown(max_tokens)} instead.",
                          param=param, code="integer_above_max_value")
    return max_tokens, param


def _parse_options(body: dict, defaults: GenerationOptions) -> GenerationOptions:
    temperature = _optional(body, "temperature", float, None)
    if temperature is not None and not 0 <= temperature <= 2:  # NaN fails every comparison
        raise bad_request(f"temperature must be between 0 and 2; got {temperature}", param="temperature")
    top_p = _optional(body, "top_p", float, None)
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_request(f"top_p must be greater than 0 and at most 1; got {top_p}", param="top_p")
    top_k = _optional(body, "top_k", int, None)
    if top_k is not None and top_k < 0:
        raise bad_request(f"top_k must be 0 (off) or positive; got {top_k}", param="top_k")
    repetition_penalty = _optional(body, "repetition_penalty", float, None)
    if repetition_penalty is not None and not 0 < repetition_penalty <= 100:
        raise bad_request(f"repetition_penalty must be positive; got {repetition_penalty}", param="repetition_penalty")
    seed = _optional(body, "seed", int, None)
    stop = _parse_stop(body.get("stop"))
    return defaults.updated(temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed, stop=stop)


def _parse_stop(stop) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or an array of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings; got {len(stops)}", param="stop")
    return stops


def _optional(body: dict, name: str, kind: type, default, prefix: str = ""):
    """body[name] checked to be of `kind` (int accepted for float; bool never counts as a number)."""
    value = body.get(name)
    if value is None:
        return default
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
        raise bad_request(f"{prefix}{name} must be a {'number' if kind is float else kind.__name__}; "
                          f"got {shown(value)}", param=prefix + name)
    return float(value) if kind is float else value


# --- responses ---------------------------------------------------------------------------------

def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def finish_reason(completion: Completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


def completion_response(completion_id: str, model: str, completion: Completion) -> dict:
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "logprobs": None, "finish_reason": finish_reason(completion)}],
        "usage": usage(completion),
    }


def chunk(completion_id: str, model: str, delta: dict | None = None, finish: str | None = None,
          usage_counts: dict | None = None) -> dict:
    """One `chat.completion.chunk`; the usage-only chunk at the end has no choices."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    if usage_counts is not None:
        body["choices"], body["usage"] = [], usage_counts
    else:
        body["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
    return body


def models_response(models: str | Collection[str], created: int) -> dict:
    models = (models,) if isinstance(models, str) else models
    return {"object": "list",
            "data": [{"id": model, "object": "model", "created": created, "owned_by": "lorafit"} for model in models]}
