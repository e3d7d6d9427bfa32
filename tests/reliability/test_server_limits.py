"""Promise 9, one limit at a time: `max_tokens` and context limits, a bounded queue (429 with
Retry-After), a per-request time limit, and disconnects, each checked through a real HTTP client
against a server on 127.0.0.1, with the engine's rows counted afterwards; then the serve flags
through the real CLI (a bad value is one line and exit code 2) and its --help."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time

import httpx
import openai
import pytest
import torch

from lorafit.infer.loading import load_for_inference
from lorafit.infer.options import GenerationOptions
from lorafit.infer.serve import ServedModel, create_app
from lorafit.infer.serve_limits import ServeLimits
from server_helpers import running_app

MODEL = "tiny"
LONG = {"temperature": 0, "ignore_eos": True}  # runs to max_tokens, whatever the tiny model says


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's steps take ~5 ms on one thread; two threads on a busy 2-core machine spin
    against each other and take ten times that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_inference(tiny_model_dir)


@contextlib.contextmanager
def running_server(served: ServedModel, api_key: str | None = None):
    """A real uvicorn server for `served` on a free port of 127.0.0.1, in a thread; yields its /v1
    address. Its log goes to the root logger (log_config=None), where caplog sees it."""
    app = create_app(served, MODEL, api_key=api_key)
    try:
        with running_app(app, backlog=128, stop_seconds=30, log_config=None, log_level="info",
                     access_log=False) as url:
            yield f"{url}/v1"
    finally:
        served.close()


def slow_steps(served: ServedModel, seconds: float) -> None:
    """Make every decode step take at least `seconds`, so answers outlast the test's deadlines."""
    decode = served.engine._decode
    served.engine._decode = lambda: (time.sleep(seconds), decode())


def chat_body(text="Hello", **fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **fields}


def post(url, body, timeout=60):
    return httpx.post(f"{url}/chat/completions", json=body, timeout=timeout)


def wait_until(condition, seconds=10.0):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.01)


def assert_quiet(caplog):
    """Nothing at WARNING or above in the server's log, and no traceback."""
    loud = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, loud


def test_max_tokens_and_context_limits(loaded, caplog):
    served = ServedModel(loaded, GenerationOptions(max_new_tokens=16),
                         limits=ServeLimits(max_new_tokens_limit=100, max_model_len=120))
    with running_server(served) as url:
        over = post(url, chat_body(max_tokens=101))
        assert over.status_code == 400
        error = over.json()["error"]
        assert error["param"] == "max_tokens" and error["code"] == "integer_above_max_value"
        assert "<= 100" in error["message"] and "101" in error["message"]
        over = post(url, chat_body(max_completion_tokens=500))
        assert over.status_code == 400 and over.json()["error"]["param"] == "max_completion_tokens"

        prompt_tokens = post(url, chat_body(max_tokens=1)).json()["usage"]["prompt_tokens"]
        fits = 120 - prompt_tokens
        assert post(url, chat_body(max_tokens=fits)).status_code == 200
        beyond = post(url, chat_body(max_tokens=fits + 1))
        assert beyond.status_code == 400
        error = beyond.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
        assert (f"maximum context length is 120 tokens" in error["message"]
                and f"you requested 121 tokens ({prompt_tokens} in the messages, {fits + 1} in the completion)"
                in error["message"])

        long_prompt = post(url, chat_body("word " * 200))
        assert long_prompt.status_code == 400
        assert long_prompt.json()["error"]["param"] == "messages"
        assert "maximum context length is 120 tokens" in long_prompt.json()["error"]["message"]

        # Without max_tokens a request gets what fits (vLLM's rule), not an error.
        served.defaults = GenerationOptions(max_new_tokens=100)
        answer = post(url, chat_body(**LONG))
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "length"
        assert answer.json()["usage"]["completion_tokens"] == min(fits, 100)
    assert_quiet(caplog)


def test_a_full_queue_answers_429_with_retry_after(loaded, caplog):
    served = ServedModel(loaded, GenerationOptions(max_new_tokens=16), max_batch_size=1,
                         limits=ServeLimits(max_queued_requests=1))
    slow_steps(served, 0.02)
    client_options = dict(max_retries=0, timeout=60)
    with running_server(served) as url:
        client = openai.OpenAI(base_url=url, api_key="none", **client_options)
        long_stream = client.chat.completions.create(model=MODEL, messages=chat_body()["messages"], stream=True,
                                                     max_tokens=400, extra_body=LONG)
        next(iter(long_stream))  # running: the one batch row is taken
        with httpx.Client(timeout=60) as waiting_client:
            waiting = threading.Thread(target=lambda: waiting_client.post(f"{url}/chat/completions",
                                                                          json=chat_body(max_tokens=2)))
            waiting.start()
            wait_until(lambda: served.engine.unfinished == 2)  # ... and one waits: the queue is full

            for stream in (False, True):
                refused = post(url, chat_body(max_tokens=2, stream=stream))
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "1"
                error = refused.json()["error"]
                assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
                assert "--max_queued_requests" in error["message"]
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=MODEL, messages=chat_body()["messages"], max_tokens=2)
            assert served.engine.unfinished == 2  # refusals hold nothing

            long_stream.close()  # the running one leaves: the waiting one runs, and there is room again
            waiting.join(timeout=30)
        wait_until(lambda: served.engine.unfinished == 0)
        assert post(url, chat_body(max_tokens=2)).status_code == 200
    assert_quiet(caplog)


def test_a_request_past_its_time_limit_is_stopped_and_its_rows_freed(loaded, caplog):
    served = ServedModel(loaded, GenerationOptions(max_new_tokens=16), max_batch_size=1,
                         limits=ServeLimits(request_timeout=1.0))
    slow_steps(served, 0.02)  # 400 tokens would take 8 s
    with running_server(served) as url:
        quick = post(url, chat_body(max_tokens=3))
        assert quick.status_code == 200  # well within the limit

        started = time.monotonic()
        slow = post(url, chat_body(max_tokens=400, **LONG))
        assert slow.status_code == 504
        error = slow.json()["error"]
        assert error["code"] == "request_timeout" and error["type"] == "timeout_error"
        assert "1 s (--request_timeout)" in error["message"]
        assert 1 <= time.monotonic() - started < 5
        wait_until(lambda: served.engine.unfinished == 0 and served.engine.running == 0, seconds=2)

        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model=MODEL, messages=chat_body()["messages"], stream=True,
                                                max_tokens=400, extra_body=LONG)
        chunks = []
        with pytest.raises(openai.APIError, match="--request_timeout"):
            for event in stream:  # content arrives, then the error event ends the stream
                chunks.append(event)
        assert any(c.choices and c.choices[0].delta.content for c in chunks)
        wait_until(lambda: served.engine.unfinished == 0, seconds=2)

        with httpx.stream("POST", f"{url}/chat/completions", json=chat_body(max_tokens=400, stream=True, **LONG),
                          timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
        assert response.status_code == 200 and lines[-1] == "data: [DONE]"
        assert '"code": "request_timeout"' in lines[-2]
    assert_quiet(caplog)


def test_the_engine_bounds_its_queue_and_times_out_waiting_requests(loaded):
    """Below HTTP: capacity is max_batch_size + max_queued unfinished requests; cancelled waiting
    requests give their place back at once; a request that runs out of time while waiting leaves
    with finish reason "timeout" and nothing generated, while the running one goes on."""
    from lorafit.infer.engine import BatchingEngine, QueueFullError

    engine = BatchingEngine(loaded.model, loaded.tokenizer, pad_token_id=loaded.tokenizer.pad_token_id,
                            max_batch_size=1, max_queued=2)
    prompt = loaded.tokenizer("Hello")["input_ids"]
    long = GenerationOptions(temperature=0, max_new_tokens=300)
    running = engine.submit(prompt, long)
    engine.step()
    assert engine.running == 1
    first = engine.submit(prompt, long)
    expiring = engine.submit(prompt, long, timeout=0.05)
    with pytest.raises(QueueFullError):
        engine.submit(prompt, long)
    first.cancel()  # a client that left while waiting: its place is free before the next step
    assert engine.submit(prompt, long) is not None
    time.sleep(0.06)
    engine.step()
    completion = expiring.done.result(timeout=0)
    assert completion.finish_reason == "timeout" and completion.completion_tokens == 0
    assert first.done.result(timeout=0) is None  # left before its turn: nothing generated
    assert engine.running == 1 and not running.done.done() and engine.unfinished == 2
    running.cancel()
    engine.run_until_idle()
    assert engine.unfinished == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_rows(loaded, caplog, stream):
    served = ServedModel(loaded, GenerationOptions(max_new_tokens=16), max_batch_size=2)
    slow_steps(served, 0.02)
    with running_server(served) as url:
        body = chat_body(max_tokens=400, stream=stream, **LONG)
        if stream:
            with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if '"content"' in line and served.engine.running == 1:
                        break  # hang up mid-answer
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
                post(url, body, timeout=0.5)
        wait_until(lambda: served.engine.unfinished == 0 and served.engine.running == 0, seconds=3)
        assert post(url, chat_body(max_tokens=2)).status_code == 200
    assert_quiet(caplog)


def run_serve(capsys, *args, model=None) -> tuple[int, str, str]:
    """`lorafit serve ...` through the CLI's entry point, in this process (a subprocess would spend
    seconds importing torch for each case; tests/reliability/test_user_mistakes.py runs the real
    process): exit code, stdout, stderr."""
    from lorafit import cli

    argv = ["serve", "--port", "0", *(["--model_name_or_path", model] if model else []), *args]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse: --help
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, phrase", [
    (["--max_queued_requests", "-1"], "--max_queued_requests must be an integer of at least 0, got -1"),
    (["--request_timeout", "-5"], "--request_timeout must be a number of seconds"),
    (["--request_timeout", "nan"], "--request_timeout must be a number of seconds"),
    (["--max_new_tokens_limit", "0"], "--max_new_tokens_limit must be an integer of at least 1"),
    (["--max_body_bytes", "10"], "--max_body_bytes must be an integer of at least 1024"),
    (["--max_model_len", "1"], "--max_model_len must be an integer of at least 2"),
    (["--max_new_tokens", "600", "--max_new_tokens_limit", "500"], "--max_new_tokens 600 is more than"),
])
def test_bad_limit_flags_are_one_line_and_exit_2(capsys, args, phrase):
    code, _, err = run_serve(capsys, *args)
    assert code == 2 and phrase in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_max_model_len_beyond_the_model_is_refused(capsys, tiny_model_dir):
    code, _, err = run_serve(capsys, "--max_model_len", "100000", model=tiny_model_dir)
    assert code == 2 and "Traceback" not in err
    assert "--max_model_len 100000 is more than this model's context length (512 tokens)" in err


def test_help_describes_every_limit(capsys):
    code, out, _ = run_serve(capsys, "--help")
    help_text = " ".join(out.split())
    assert code == 0
    for flag, words in [("--max_body_bytes", "413"), ("--max_new_tokens_limit", "max_tokens"),
                        ("--max_model_len", "context length"), ("--max_queued_requests", "429 with Retry-After"),
                        ("--request_timeout", "504"), ("--max_batch_size", "decoded together")]:
        entry = re.search(rf"(?<!\[){flag} [A-Z_]+ (.{{0,300}})", help_text)  # not the usage line's [--flag X]
        assert entry and words in entry.group(1), (flag, entry and entry.group(1))
