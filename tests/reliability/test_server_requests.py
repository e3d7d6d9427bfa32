"""Promise 5, where data enters the server: whatever a client sends is a 4xx with an OpenAI error
body, never a 5xx or a traceback.

Hypothesis feeds the request parser (`openai_api.decode_json_body`, `parse_chat_request`) random
bytes, mutated JSON and valid requests with fields swapped for junk (wrong types, nulls, nesting,
NaN, lone surrogates, huge numbers); then a table of malformed requests goes through a live server
over HTTP, whose log must stay quiet and which must still answer afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lorafit.infer.openai_api import APIError, ChatRequest, decode_json_body, parse_chat_request
from lorafit.infer.options import GenerationOptions
from lorafit.infer.serve import ServedModel
from lorafit.infer.serve_limits import ServeLimits, _is_json
from test_server_limits import MODEL, assert_quiet, loaded, one_torch_thread, running_server  # noqa: F401

DEFAULTS = GenerationOptions(max_new_tokens=16)
LIMIT = 64
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates included
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats() | any_text)
json_like = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)
FIELDS = ["model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "repetition_penalty", "seed", "stop", "n", "tools", "functions", "logprobs",
          "top_logprobs", "response_format", "presence_penalty", "frequency_penalty", "ignore_eos"]
plausible = {
    "model": st.just(MODEL), "stream": st.booleans(), "max_tokens": st.integers(-3, 2 * LIMIT),
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-2, 100),
    "repetition_penalty": st.floats(-1, 200), "seed": st.integers(-2**65, 2**65),
    "stop": st.lists(any_text, max_size=6) | any_text, "n": st.integers(0, 3),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_like}),
}
role = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard", ""]) | json_like
content = any_text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": any_text}) | json_like,
                              max_size=3) | json_like
message = st.fixed_dictionaries({}, optional={"role": role, "content": content}) | json_like


@st.composite
def requests(draw):
    """A valid request with some fields replaced by plausible values, junk, or nothing."""
    messages = st.just([{"role": "user", "content": "Hi"}]) | st.lists(message, min_size=1, max_size=3) | json_like
    body = {"model": MODEL, "messages": draw(messages)}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=5, unique=True)):
        if name == "messages":
            body.pop(name)
        elif draw(st.booleans()) and name in plausible:
            body[name] = draw(plausible[name])
        elif draw(st.booleans()):
            body[name] = draw(json_like)
        else:
            body.pop(name, None)
    return body


def assert_client_error(error: APIError) -> None:
    assert 400 <= error.status < 500
    body = error.body()["error"]
    assert isinstance(body["message"], str) and body["message"] and body["type"]
    assert len(body["message"]) < 600  # values are quoted cut short, never echoed whole
    json.dumps(error.body(), ensure_ascii=False).encode("utf-8")  # what the server sends must encode


def parse_or_refuse(body) -> ChatRequest | None:
    try:
        chat = parse_chat_request(body, DEFAULTS, MODEL, max_new_tokens_limit=LIMIT)
    except APIError as error:
        assert_client_error(error)
        return None
    assert chat.options.validate() is chat.options  # every accepted option is in range
    assert chat.max_tokens is None or 1 <= chat.max_tokens <= LIMIT
    assert all(isinstance(m["content"], str) and m["role"] in ("system", "user", "assistant", "tool")
               for m in chat.messages)
    return chat


@FUZZ
@given(requests())
@example({"model": MODEL, "messages": [{"role": ["user"], "content": "unhashable role"}]})
@example({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "seed": 2**64})
@example({"model": "x" * 100_000, "messages": []})
def test_the_parser_accepts_or_refuses_with_a_4xx(body):
    parse_or_refuse(body)


@FUZZ
@given(json_like)
def test_any_json_value_is_accepted_or_refused_with_a_4xx(value):
    parse_or_refuse(value)


def mutations(raw: bytes):
    """Byte-level edits of a serialized request: cut it, flip bytes, insert junk."""
    return st.lists(st.tuples(st.integers(0, max(len(raw) - 1, 0)), st.sampled_from(["cut", "flip", "insert"]),
                              st.binary(min_size=1, max_size=4)), min_size=1, max_size=4)


@FUZZ
@given(st.data())
def test_mutated_request_bytes_are_decoded_or_refused_with_a_4xx(data):
    raw = bytearray(json.dumps(data.draw(requests()), ensure_ascii=data.draw(st.booleans())).encode("utf-8",
                                                                                                   "surrogatepass"))
    for position, edit, junk in data.draw(mutations(bytes(raw))):
        if edit == "cut":
            del raw[position:]
        elif edit == "flip" and position < len(raw):
            raw[position] ^= junk[0]
        else:
            raw[position:position] = junk
    decode_then_parse(bytes(raw))


@FUZZ
@given(st.binary(max_size=64))
@example(b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}')  # invalid UTF-8
@example(b'{"model": "tiny", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}')  # UTF-8 of a surrogate
@example(b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}')  # an escaped lone surrogate
@example(b'{"temperature": NaN}')
@example(b'{"max_tokens": 1' + b"0" * 5000 + b"}")  # past Python's int-from-string digit limit
@example(b"[" * 100_000)
@example(b"\xef\xbb\xbf{}")  # a UTF-8 byte order mark
def test_any_bytes_are_decoded_or_refused_with_a_4xx(raw):
    decode_then_parse(raw)


def decode_then_parse(raw: bytes) -> None:
    try:
        body = decode_json_body(raw)
    except APIError as error:
        assert_client_error(error)
        return
    json.dumps(body, ensure_ascii=False).encode("utf-8")  # what passed decoding is text, all of it
    parse_or_refuse(body)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
@example("application/json; charset=utf-8")
@example("application/vnd.api+json")
@example('application/json; charset="\x00"; ;;==')
def test_any_content_type_is_judged_without_an_error(content_type):
    assert _is_json(content_type) in (True, False)


# --- through a live server ----------------------------------------------------------------------

def valid(**changes):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **changes}


JSON = {"Content-Type": "application/json"}
MALFORMED = [  # (what, body bytes, headers, expected status)
    ("invalid JSON", b'{"model": "tiny", "messages": [', JSON, 400),
    ("empty body", b"", JSON, 400),
    ("not an object", b"[1, 2]", JSON, 400),
    ("messages a string", json.dumps(valid(messages="hi")).encode(), JSON, 400),
    ("temperature a string", json.dumps(valid(temperature="hot")).encode(), JSON, 400),
    ("max_tokens a string", json.dumps(valid(max_tokens="10")).encode(), JSON, 400),
    ("max_tokens a float", json.dumps(valid(max_tokens=2.5)).encode(), JSON, 400),
    ("stream a string", json.dumps(valid(stream="yes")).encode(), JSON, 400),
    ("stop a number", json.dumps(valid(stop=5)).encode(), JSON, 400),
    ("role a list", json.dumps(valid(messages=[{"role": ["user"], "content": "x"}])).encode(), JSON, 400),
    ("content an object", json.dumps(valid(messages=[{"role": "user", "content": {"a": 1}}])).encode(), JSON, 400),
    ("no model", json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode(), JSON, 400),
    ("no messages", json.dumps({"model": MODEL}).encode(), JSON, 400),
    ("message without content", json.dumps(valid(messages=[{"role": "user"}])).encode(), JSON, 400),
    ("model null", json.dumps(valid(model=None)).encode(), JSON, 400),
    ("messages [null]", json.dumps(valid(messages=[None])).encode(), JSON, 400),
    ("every field null", json.dumps({name: None for name in FIELDS}).encode(), JSON, 400),
    ("nested junk", json.dumps(valid(temperature={"a": [{"b": [[], {}]}]})).encode(), JSON, 400),
    ("nested too deeply", b'{"model": "tiny", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", JSON, 400),
    ("huge prompt", json.dumps(valid(messages=[{"role": "user", "content": "word " * 150_000}])).encode(), JSON, 400),
    ("huge model name", json.dumps(valid(model="m" * 500_000)).encode(), JSON, 404),
    ("huge integer", b'{"model": "tiny", "max_tokens": 1' + b"0" * 5000 + b"}", JSON, 400),
    ("NaN", b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', JSON, 400),
    ("invalid UTF-8", b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}', JSON, 400),
    ("lone surrogate", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udc80"}]}', JSON, 400),
    ("text/plain", json.dumps(valid()).encode(), {"Content-Type": "text/plain"}, 415),
    ("a form", b"model=tiny&messages=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("over the body limit", b'{"model": "' + b"x" * (2 << 20) + b'"}', JSON, 413),
]


@pytest.fixture(scope="module")
def server(loaded):  # noqa: F811 (the fixture imported above)
    served = ServedModel(loaded, DEFAULTS, max_batch_size=2, limits=ServeLimits(max_new_tokens_limit=LIMIT))
    with running_server(served) as url:
        yield url


@pytest.mark.parametrize("what, body, headers, status", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_requests_over_http_get_4xx_and_a_quiet_log(server, caplog, what, body, headers, status):
    response = httpx.post(f"{server}/chat/completions", content=body, headers=headers, timeout=120)
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["type"] and {"param", "code"} <= error.keys()
    assert len(response.content) < 2000
    assert_quiet(caplog)


def test_the_server_still_answers_after_the_malformed_requests(server, caplog):
    chunked = httpx.post(f"{server}/chat/completions", content=iter([b"{" + b" " * (1 << 20), b"}"]),
                         headers=JSON, timeout=60)  # no Content-Length: refused while reading
    assert chunked.status_code == 413
    no_type = httpx.post(f"{server}/chat/completions", content=json.dumps(valid()).encode(), timeout=60)
    assert no_type.status_code == 200  # no Content-Type at all: read as JSON
    wrong_method = httpx.get(f"{server}/chat/completions", timeout=60)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    answer = httpx.post(f"{server}/chat/completions", json=valid(), timeout=60)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["role"] == "assistant"
    assert_quiet(caplog)
