"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from lorafit.data.render import render_prompt
from lorafit.infer.loading import load_for_inference
from lorafit.infer.options import GenerationOptions
from lorafit.infer.serve import ServedModel, create_app
from lorafit.infer.serve_limits import ServeLimits
from server_helpers import running_app

API_KEY = "test-key-123"
MODEL = "tiny"
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_inference(tiny_model_dir)


@pytest.fixture(scope="module")
def served(loaded):
    return ServedModel(loaded, GenerationOptions(max_new_tokens=16), max_batch_size=4,
                       limits=ServeLimits(max_body_bytes=4096))


@pytest.fixture(scope="module")
def server_url(served):
    """A real uvicorn server on a free port of 127.0.0.1, in a background thread."""
    with running_app(create_app(served, MODEL, api_key=API_KEY)) as url:
        yield f"{url}/v1"


@pytest.fixture
def client(server_url):
    return openai.OpenAI(base_url=server_url, api_key=API_KEY, max_retries=0, timeout=60)


def ask(text):
    return [{"role": "user", "content": text}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_non_streaming_completion_with_usage(client, loaded):
    response = client.chat.completions.create(model=MODEL, messages=ask("Hello!"), **GREEDY)
    choice = response.choices[0]
    assert response.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)
    prompt_tokens = len(render_prompt(loaded.tokenizer, ask("Hello!")))
    assert response.usage.prompt_tokens == prompt_tokens
    assert 1 <= response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens


def test_streaming_gives_the_same_answer_in_pieces(client):
    whole = client.chat.completions.create(model=MODEL, messages=ask("Tell me a story"), **GREEDY)
    stream = client.chat.completions.create(
        model=MODEL, messages=ask("Tell me a story"), stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_concurrent_requests_are_not_interleaved(client):
    prompts = [f"Question number {i}?" for i in range(4)]
    alone = [client.chat.completions.create(model=MODEL, messages=ask(p), **GREEDY).choices[0].message.content
             for p in prompts]

    def streamed(prompt):
        stream = client.chat.completions.create(model=MODEL, messages=ask(prompt), stream=True, **GREEDY)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == alone


def test_requests_joining_a_running_batch_get_their_solo_answers(client, served):
    """Different prompt lengths, max_tokens and stop strings, arriving one after another while the
    first is still decoding: each answer equals the one the same request gets alone."""
    asks = [("Write a long story.", 200, None), ("Hi", 12, None), ("What is the capital of France, and why?", 40, 1),
            ("Name a few colours", 25, 2)]
    requests = []
    for text, max_tokens, stop_at in asks:
        request = dict(messages=ask(text), temperature=0, max_tokens=max_tokens, extra_body={"ignore_eos": True})
        if stop_at is not None:
            free = client.chat.completions.create(model=MODEL, **request).choices[0].message.content
            request["stop"] = [free[stop_at * 5:stop_at * 5 + 3]]
        requests.append(request)
    solo = [client.chat.completions.create(model=MODEL, **r).choices[0] for r in requests]
    assert [c.finish_reason for c in solo] == ["length", "length", "stop", "stop"]

    most_running = []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            most_running.append(served.engine.running)
            time.sleep(0.002)

    def answer(index):
        time.sleep(0.05 * index)  # arrive one after another
        if index % 2:  # half of them streaming
            stream = client.chat.completions.create(model=MODEL, stream=True, **requests[index])
            chunks = [c for c in stream if c.choices]
            return ("".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason)
        choice = client.chat.completions.create(model=MODEL, **requests[index]).choices[0]
        return choice.message.content, choice.finish_reason

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(answer, range(len(requests))))
    watching.set()
    watcher.join()
    assert together == [(c.message.content, c.finish_reason) for c in solo]
    assert max(most_running) >= 2  # they did share the batch


def test_a_streaming_client_that_disconnects_leaves_the_batch(server_url, client, served, monkeypatch):
    submitted = []
    submit = served.submit

    def recording_submit(*args, **kwargs):
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]

    monkeypatch.setattr(served, "submit", recording_submit)
    long_answer = dict(model=MODEL, temperature=0, max_tokens=200, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(2) as pool:
        staying = [pool.submit(lambda t=t: client.chat.completions.create(messages=ask(t), **long_answer))
                   for t in ("first", "second")]
        body = {"model": MODEL, "messages": ask("leaving"), "stream": True, "ignore_eos": True, "max_tokens": 200}
        with httpx.stream("POST", f"{server_url}/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            content_chunks = 0
            for line in response.iter_lines():
                content_chunks += '"content": "' in line and '"content": ""' not in line
                if content_chunks == 3:
                    break  # and hang up mid-answer
        left = next(r for r in submitted if r.on_text is not None)
        completion = left.done.result(timeout=30)
        assert completion.finish_reason == "cancelled" and completion.completion_tokens < 200
        answers = [future.result() for future in staying]
    assert [a.usage.completion_tokens for a in answers] == [200, 200]
    alone = [client.chat.completions.create(messages=ask(t), **long_answer).choices[0].message.content
             for t in ("first", "second")]
    assert [a.choices[0].message.content for a in answers] == alone


def test_stop_string_and_extra_sampling_fields(client):
    free = client.chat.completions.create(model=MODEL, messages=ask("abc"), **GREEDY).choices[0].message.content
    if len(free) < 3:
        pytest.skip("the tiny model stopped too early to test a stop string")
    stop = free[1:3]
    response = client.chat.completions.create(
        model=MODEL, messages=ask("abc"), stop=[stop], extra_body={"top_k": 1, "repetition_penalty": 1.0}, **GREEDY
    )
    assert response.choices[0].message.content == free[:free.index(stop)]
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, param", [
    ({"messages": []}, "messages"),
    ({"messages": ask("hi"), "temperature": 5}, "temperature"),
    ({"messages": ask("hi"), "top_p": 0}, "top_p"),
    ({"messages": ask("hi"), "max_tokens": 0}, "max_tokens"),
    ({"messages": ask("hi"), "n": 2}, "n"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": ask("hi"), "extra_body": {"ignore_eos": "yes"}}, "ignore_eos"),
])
def test_bad_requests_get_openai_style_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, **kwargs)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param and caught.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=ask("hi"))


def test_wrong_or_missing_key_is_401(server_url):
    wrong = openai.OpenAI(base_url=server_url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=MODEL, messages=ask("hi"))
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    response = httpx.get(f"{server_url}/models")
    assert response.status_code == 401 and "error" in response.json()


def test_the_key_is_compared_in_constant_time(server_url, monkeypatch):
    """Every key check goes through `hmac.compare_digest` (time independent of where the keys differ)."""
    import hmac

    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    assert httpx.get(f"{server_url}/models", headers={"Authorization": "Bearer not-the-key"}).status_code == 401
    assert httpx.get(f"{server_url}/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert seen == [(b"not-the-key", API_KEY.encode()), (API_KEY.encode(), API_KEY.encode())]


def raw_post(server_url, content, headers=None):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server_url}/chat/completions", content=content, headers=headers, timeout=60)


def test_malformed_json_and_oversized_bodies_then_still_serving(server_url, client):
    malformed = raw_post(server_url, b'{"model": "tiny", "messages": [')
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    not_object = raw_post(server_url, b'[1, 2]')
    assert not_object.status_code == 400
    too_deep = raw_post(server_url, b'[' * 3000)  # under the size limit, past json's recursion limit
    assert too_deep.status_code == 400 and "nested too deeply" in too_deep.json()["error"]["message"]
    huge = json.dumps({"model": MODEL, "messages": ask("x" * 10_000)}).encode()
    oversized = raw_post(server_url, huge)
    assert oversized.status_code == 413 and oversized.json()["error"]["code"] == "request_too_large"
    missing_model = raw_post(server_url, json.dumps({"messages": ask("hi")}).encode())
    assert missing_model.status_code == 400 and missing_model.json()["error"]["param"] == "model"
    unknown_route = httpx.get(f"{server_url}/nothing-here", headers={"Authorization": f"Bearer {API_KEY}"})
    assert unknown_route.status_code == 404 and "error" in unknown_route.json()
    # ... and the server is still answering.
    assert client.chat.completions.create(model=MODEL, messages=ask("still there?"), **GREEDY).choices


def test_serve_command_binds_localhost_and_answers(tiny_model_dir):
    """`lorafit serve` end to end: default host 127.0.0.1, --port 0 picks a free port, --api_key enforced."""
    import os
    import re
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "lorafit", "serve", "--model_name_or_path", tiny_model_dir, "--port", "0",
         "--api_key", "k", "--served_model_name", "cli-model", "--max_new_tokens", "4", "--log_level", "warning"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = None
        for line in process.stderr:  # the server announces its address once it is ready to serve
            found = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
            if found:
                url = found.group(1)
                break
        assert url, "no address announced"
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(url.removesuffix("/v1") + "/health").status_code == 200:
                    break
            except httpx.ConnectError:
                assert time.time() < deadline
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        reply = client.chat.completions.create(model="cli-model", messages=ask("hi"))
        assert reply.usage.completion_tokens <= 4  # the command's --max_new_tokens is the default
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_client_that_leaves_frees_the_worker(loaded):
    """A non-streaming request whose client disconnects stops generating (or never starts)."""
    import asyncio
    import dataclasses

    from lorafit.infer.serve import complete_unless_client_leaves

    class LeavingRequest:
        def __init__(self, leave_after_polls):
            self.polls = leave_after_polls

        async def is_disconnected(self):
            self.polls -= 1
            return self.polls < 0

    # No stop tokens: only the departure of the client can end the answer before the context is full.
    served = ServedModel(dataclasses.replace(loaded, stop_token_ids=[]), GenerationOptions(max_new_tokens=16),
                         max_batch_size=1)
    prompt = render_prompt(loaded.tokenizer, ask("hello"))
    options = GenerationOptions(temperature=0, max_new_tokens=10_000)
    blocker = served.submit(prompt, options)  # fills the batch: the next request waits for room

    async def scenario():
        pending = asyncio.ensure_future(
            complete_unless_client_leaves(served, LeavingRequest(0), prompt, options, poll_seconds=0.01))
        await asyncio.sleep(0.1)  # the client is gone by now
        blocker.cancel()
        return await pending

    assert asyncio.run(scenario()) is None  # its turn came after it left: nothing was generated
    assert blocker.done.result().finish_reason == "cancelled"

    async def leaves_during_generation():
        return await complete_unless_client_leaves(served, LeavingRequest(3), prompt, options, poll_seconds=0.01)

    started = time.perf_counter()
    completion = asyncio.run(leaves_during_generation())
    assert completion is not None and completion.finish_reason == "cancelled"
    assert len(completion.token_ids) < 400 and time.perf_counter() - started < 30
    served.close()
