"""Server under load and abuse: concurrent streaming clients for a fixed time against a started
`lorafit serve`, with malformed, oversized and disconnecting clients mixed in (issue 12, promise 9).

    python bench/bench_serve_load.py                       # embedded model, 16 streaming clients, 60 s
    python bench/bench_serve_load.py --duration 10 --model path/to/model --max_batch_size 4

Clients, each in its own thread with its own connection, from start to `--duration` seconds:
  streaming    `--clients` of them: greedy streamed chat requests with `ignore_eos` and 16-64 new
               tokens, 0-0.5 s apart; each answer is checked whole (role chunk, content, finish
               chunk, usage with exactly max_tokens tokens, [DONE]). A 429 is waited out as its
               Retry-After says, then the same request is sent again, until it is answered.
  malformed    invalid JSON, wrong types, nulls, nested junk, invalid UTF-8, NaN, a huge integer,
               a wrong Content-Type: each must get 400 or 415.
  oversized    a body over --max_body_bytes (413), max_tokens over --max_new_tokens_limit (400), a
               prompt longer than the context (400).
  disconnect   two clients that leave mid-answer: one streaming (after two content events), one
               not streaming (it stops waiting after 0.3 s); a 429 is waited out and tried again.
After `--duration` no new request starts and the ones under way finish. The server's RSS is read
from /proc every 0.2 s. Prints requests completed, 429s, answers by status, p50/p95 latency (from
a request's first try to its last token, 429 waits included), tokens/s and the server's peak RSS,
and the verdict on each promise. `tests/reliability/test_server_load.py` runs a short version on
the tiny test model and asserts the same verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["Write a story about a lighthouse keeper.", "Explain how a steam engine works.", "Describe a busy market.",
           "Write a letter from a sailor to his family.", "Give a short history of the bicycle.",
           "Tell a fairy tale about a fox who wants to fly.", "How do you bake bread at home?",
           "Why do people enjoy watching the sea?"]
JSON = {"Content-Type": "application/json"}


@dataclass
class LoadConfig:
    model: str | None = None  # None: the embedded smollm2-135m-instruct
    clients: int = 16
    duration: float = 60.0
    max_batch_size: int = 8
    max_queued_requests: int = 4  # small, so that 16 clients do fill the queue
    request_timeout: float = 300.0
    max_body_bytes: int = 65536
    max_new_tokens_limit: int = 256
    min_tokens: int = 16
    max_tokens: int = 64
    dtype: str = "float32"
    drain_seconds: float = 300.0  # how long requests under way at the end may take to finish
    env: dict = field(default_factory=dict)  # extra environment for the server


@dataclass
class Outcome:
    role: str  # streaming, malformed, oversized, disconnect
    kind: str  # what was sent
    started: float
    ended: float
    status: int | None  # None: no response (the client left on purpose)
    complete: bool = False  # a well-formed answer arrived whole
    tokens: int = 0
    retry_after: str | None = None
    error_code: str | None = None
    problem: str | None = None  # what was wrong with the response, if anything


@dataclass
class LoadResult:
    config: LoadConfig
    outcomes: list[Outcome]
    answered: list[tuple[float, float, int]]  # streaming requests answered: (first try, done, tokens)
    unanswered: int  # streaming requests that never got a whole answer
    rss_samples: list[tuple[float, int]]  # (seconds since start, RSS bytes)
    rss_before_load: int
    peak_rss: int  # VmHWM at the end: the most the server process ever held
    server_alive: bool
    server_log: str
    wall: float


def start_server(config: LoadConfig, log_path: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "lorafit", "serve", "--port", "0", "--log_level", "warning",
               "--served_model_name", "load", "--dtype", config.dtype,
               "--max_batch_size", str(config.max_batch_size), "--max_queued_requests", str(config.max_queued_requests),
               "--request_timeout", str(config.request_timeout), "--max_body_bytes", str(config.max_body_bytes),
               "--max_new_tokens_limit", str(config.max_new_tokens_limit), "--max_new_tokens", str(config.max_tokens)]
    if config.model:
        command += ["--model_name_or_path", config.model]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **config.env})
    deadline = time.time() + 600
    while time.time() < deadline:
        found = re.search(r"at (http://\S+/v1)", log_path.read_text())
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            raise RuntimeError(f"lorafit serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("lorafit serve did not announce its address within 10 minutes")


def read_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes (Linux /proc)."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, kilobytes = line.split()[:2]
                values[name.rstrip(":")] = int(kilobytes) * 1024
    return values


def streaming_request(client: httpx.Client, rng: random.Random, config: LoadConfig) -> tuple[Outcome, dict]:
    max_tokens = rng.randint(config.min_tokens, config.max_tokens)
    body = {"model": "load", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    return send_streaming(client, body), body


def send_streaming(client: httpx.Client, body: dict) -> Outcome:
    """One try; the outcome says whether the answer arrived whole."""
    outcome = Outcome("streaming", "chat", time.perf_counter(), 0.0, None)
    with client.stream("POST", "/chat/completions", json=body, headers=JSON) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            response.read()
            outcome.retry_after = response.headers.get("retry-after")
            outcome.error_code = error_code(response)
        else:
            outcome.complete, outcome.tokens, outcome.problem = check_stream(response.iter_lines(), body["max_tokens"])
    outcome.ended = time.perf_counter()
    return outcome


def check_stream(lines, max_tokens: int) -> tuple[bool, int, str | None]:
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return False, 0, "no [DONE] at the end"
    chunks = [json.loads(event) for event in events[:-1]]
    if any("error" in chunk for chunk in chunks):
        return False, 0, f"error event: {next(c for c in chunks if 'error' in c)['error']}"
    deltas = [c["choices"][0] for c in chunks if c.get("choices")]
    if not deltas or deltas[0]["delta"].get("role") != "assistant":
        return False, 0, "no role chunk first"
    if deltas[-1]["finish_reason"] != "length" or not chunks[-1].get("usage"):
        return False, 0, f"ends without finish_reason 'length' and usage: {chunks[-2:]}"
    tokens = chunks[-1]["usage"]["completion_tokens"]
    if tokens != max_tokens:
        return False, tokens, f"{tokens} tokens, asked for {max_tokens} with ignore_eos"
    return True, tokens, None


def error_code(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"] or response.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return "not an OpenAI error body"


MALFORMED = [
    ("invalid JSON", b'{"model": "load", "messages": [', JSON),
    ("wrong types", b'{"model": "load", "messages": "hi", "temperature": "hot"}', JSON),
    ("nulls", b'{"model": null, "messages": [null]}', JSON),
    ("nested junk", b'{"model": "load", "messages": ' + b"[" * 3000 + b"]" * 3000 + b"}", JSON),
    ("invalid UTF-8", b'{"model": "load", "messages": [{"role": "user", "content": "\xff\xfe"}]}', JSON),
    ("NaN", b'{"model": "load", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', JSON),
    ("huge integer", b'{"model": "load", "max_tokens": 1' + b"0" * 5000 + b"}", JSON),
    ("wrong Content-Type", b'{"model": "load", "messages": [{"role": "user", "content": "Hi"}]}',
     {"Content-Type": "text/plain"}),
]


def abusive_request(client: httpx.Client, role: str, index: int, config: LoadConfig) -> Outcome:
    if role == "malformed":
        kind, body, headers = MALFORMED[index % len(MALFORMED)]
    else:
        oversized = [("body over --max_body_bytes", {"model": "load", "messages": [
                         {"role": "user", "content": "x" * (config.max_body_bytes + 1)}]}),
                     ("max_tokens over the limit", {"model": "load", "max_tokens": config.max_new_tokens_limit + 1,
                                                    "messages": [{"role": "user", "content": "Hi"}]}),
                     ("prompt over the context", {"model": "load", "messages": [
                         {"role": "user", "content": "word " * (config.max_body_bytes // 6)}]})]
        kind, document = oversized[index % len(oversized)]
        body, headers = json.dumps(document).encode(), JSON
    outcome = Outcome(role, kind, time.perf_counter(), 0.0, None)
    response = client.post("/chat/completions", content=body, headers=headers)
    outcome.status, outcome.error_code, outcome.ended = response.status_code, error_code(response), time.perf_counter()
    return outcome


def disconnecting_request(url: str, streaming: bool, rng: random.Random, config: LoadConfig) -> Outcome:
    """Ask for a long answer and leave before it ends (a fresh connection each time: leaving closes it)."""
    body = {"model": "load", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "temperature": 0,
            "max_tokens": config.max_tokens, "ignore_eos": True, "stream": streaming}
    outcome = Outcome("disconnect", "streaming, leaves after 2 events" if streaming else "waits 0.3 s, leaves",
                      time.perf_counter(), 0.0, None)
    with httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=None if streaming else 0.3)) as client:
        try:
            with client.stream("POST", "/chat/completions", json=body, headers=JSON) as response:
                outcome.status = response.status_code
                if response.status_code == 200 and streaming:
                    contents = 0
                    for line in response.iter_lines():
                        contents += '"content"' in line
                        if contents >= 3:  # the role chunk and two of content
                            outcome.status = None
                            break
                else:
                    response.read()
                    outcome.retry_after = response.headers.get("retry-after")
                    outcome.error_code = error_code(response)
        except httpx.ReadTimeout:
            outcome.status = None  # left, as planned
    outcome.ended = time.perf_counter()
    return outcome


def run(config: LoadConfig, log=print) -> LoadResult:
    with tempfile.TemporaryDirectory() as folder:
        log_path = Path(folder) / "server.log"
        process, url = start_server(config, log_path)
        try:
            return drive(config, process, url, log_path, log)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def drive(config: LoadConfig, process: subprocess.Popen, url: str, log_path: Path, log) -> LoadResult:
    with httpx.Client(base_url=url, timeout=120) as client:  # warm-up: first-call allocations
        outcome, _ = streaming_request(client, random.Random(0), config)
        assert outcome.complete, f"warm-up request failed: {outcome}"
    rss_before = read_memory(process.pid)["VmRSS"]
    started = time.perf_counter()
    stop_at = started + config.duration
    outcomes: list[Outcome] = []
    answered: list[tuple[float, float, int]] = []
    unanswered = [0]
    samples: list[tuple[float, int]] = []
    lock = threading.Lock()

    def record(outcome: Outcome) -> None:
        with lock:
            outcomes.append(outcome)

    def streaming_client(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=url, timeout=config.drain_seconds) as client:
            while time.perf_counter() < stop_at:
                outcome, body = streaming_request(client, rng, config)
                first_try = outcome.started
                while outcome.status == 429 and time.perf_counter() < stop_at + config.drain_seconds:
                    record(outcome)
                    time.sleep(float(outcome.retry_after or 1))
                    outcome = send_streaming(client, body)
                record(outcome)
                with lock:
                    if outcome.complete:
                        answered.append((first_try - started, outcome.ended - started, outcome.tokens))
                    else:
                        unanswered[0] += 1
                time.sleep(rng.uniform(0, 0.5))  # a user reading the answer

    def abusive_client(role: str) -> None:
        rng = random.Random(role)
        index = 0
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.perf_counter() < stop_at:
                if role in ("disconnect-stream", "disconnect-wait"):
                    outcome = disconnecting_request(url, role == "disconnect-stream", rng, config)
                    record(outcome)
                    if outcome.status == 429:  # wait as told, then try again: it should get in to leave
                        time.sleep(float(outcome.retry_after or 1))
                        continue
                else:
                    record(abusive_request(client, role, index, config))
                index += 1
                time.sleep(0.05 if role in ("malformed", "oversized") else 0.2)

    finished = threading.Event()

    def sample_memory() -> None:
        while not finished.wait(0.2):
            try:
                samples.append((time.perf_counter() - started, read_memory(process.pid)["VmRSS"]))
            except (OSError, KeyError):  # the server is gone: "no crash" says so
                return

    threads = [threading.Thread(target=streaming_client, args=(i,)) for i in range(config.clients)]
    threads += [threading.Thread(target=abusive_client, args=(role,))
                for role in ("malformed", "oversized", "disconnect-stream", "disconnect-wait")]
    sampler = threading.Thread(target=sample_memory)
    sampler.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    finished.set()
    sampler.join()
    wall = time.perf_counter() - started
    log(f"load done in {wall:.1f} s; {len(outcomes)} requests")
    alive = process.poll() is None
    if alive:
        alive = httpx.get(url.removesuffix("/v1") + "/health", timeout=30).status_code == 200
    memory = read_memory(process.pid) if process.poll() is None else {"VmHWM": 0}
    return LoadResult(config, outcomes, answered, unanswered[0], samples, rss_before, memory["VmHWM"], alive,
                      log_path.read_text(), wall)


# --- verdicts and report -----------------------------------------------------------------------

EXPECTED = {"malformed": {400, 415}, "oversized": {400, 413}, "disconnect": {None, 200, 429}, "streaming": {200, 429}}


def verdicts(result: LoadResult) -> dict[str, list[str]]:
    """Each promise, with what broke it (an empty list: kept)."""
    config, outcomes = result.config, result.outcomes
    capacity = config.max_batch_size + config.max_queued_requests
    held = [o for o in outcomes if o.status == 200 or (o.role == "disconnect" and o.status is None)]
    busy_429s = []
    for refused in (o for o in outcomes if o.status == 429):
        # The server refuses only with `capacity` requests unfinished; each of those was open on
        # its client's side at that moment (a departed client's rows may stay until the next
        # step: 5 s of grace).
        overlapping = sum(1 for o in held if o.started <= refused.ended
                          and o.ended + (5.0 if o.role == "disconnect" else 0.0) >= refused.started)
        if overlapping < capacity or refused.retry_after is None or refused.error_code != "queue_full":
            busy_429s.append(f"429 with {overlapping} requests open (capacity {capacity}), Retry-After "
                             f"{refused.retry_after}, code {refused.error_code}")
    log = result.server_log
    return {
        "no 5xx": [f"{o.role} {o.kind}: {o.status}" for o in outcomes if o.status is not None and o.status >= 500],
        "no crash": [] if result.server_alive else ["the server is gone or does not answer /health"],
        "every well-formed request answered whole": (
            [f"{o.kind}: {o.problem}" for o in outcomes if o.role == "streaming" and o.status == 200 and not o.complete]
            + ([f"{result.unanswered} streaming requests never answered"] if result.unanswered else [])),
        "abuse answered as expected": [f"{o.role} {o.kind}: {o.status} {o.error_code}" for o in outcomes
                                       if o.status not in EXPECTED[o.role]],
        "429 only with the queue full, with Retry-After": busy_429s,
        "no traceback or error in the server log": [line for line in log.splitlines()
                                                    if re.search(r"Traceback|ERROR|Exception", line)][:5],
    }


def summary(result: LoadResult) -> dict:
    outcomes, answered = result.outcomes, result.answered
    latencies = sorted(done - first for first, done, _ in answered)
    last = max((done for _, done, _ in answered), default=result.wall)

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    samples = [rss for _, rss in result.rss_samples] or [0]
    return {
        "well-formed requests answered": len(answered),
        "429s": sum(o.status == 429 for o in outcomes),
        "responses by status": dict(sorted(Counter(str(o.status or "left") for o in outcomes).items())),
        "by role": dict(sorted(Counter(f"{o.role} {o.status or 'left'}" for o in outcomes).items())),
        "latency p50 s": quantile(0.5), "latency p95 s": quantile(0.95),
        "tokens/s": sum(tokens for *_, tokens in answered) / last if answered else 0.0,
        "RSS before load MB": result.rss_before_load / 2**20,
        "RSS a quarter into the load MB": samples[len(samples) // 4] / 2**20,
        "RSS max during load MB": max(samples) / 2**20, "RSS at end MB": samples[-1] / 2**20,
        "peak RSS (VmHWM) MB": result.peak_rss / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = LoadConfig()
    for name in ("model", "clients", "duration", "max_batch_size", "max_queued_requests", "request_timeout",
                 "max_tokens", "dtype"):
        default = getattr(defaults, name)
        parser.add_argument(f"--{name}", type=type(default) if default is not None else str, default=default)
    args = parser.parse_args()
    config = LoadConfig(**vars(args))
    result = run(config, log=lambda text: print(text, file=sys.stderr))
    figures = summary(result)
    print(f"model {config.model or 'smollm2-135m-instruct'} ({config.dtype}), {config.clients} streaming clients + "
          f"4 abusive ones for {config.duration:g} s, --max_batch_size {config.max_batch_size}, "
          f"--max_queued_requests {config.max_queued_requests}; {os.cpu_count()} CPUs; commit {git_commit()}")
    for name, value in figures.items():
        print(f"  {name}: {value:.2f}" if isinstance(value, float) else f"  {name}: {value}")
    broken = 0
    for promise, failures in verdicts(result).items():
        print(f"{'kept  ' if not failures else 'BROKEN'} {promise}" + "".join(f"\n    {f}" for f in failures[:5]))
        broken += bool(failures)
    return 1 if broken else 0


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
