"""Serving throughput: one client, then N clients at once, against a running `lorafit serve`.

Starts `lorafit serve` on the embedded model (or connects to `--url`), then:
  1 client    the N prompts one after another, each alone in the server (these are the solo answers)
  N clients   the same N prompts sent at once, from N threads
Every request is greedy, streams, and asks for `--max_tokens` new tokens with `ignore_eos` (the
server's benchmark-only extension field), so no answer is cut short by an early end of turn and
both runs produce the same number of tokens. Prints, for each run, total new tokens per second,
per-request latency and time to first token, the N-client / 1-client throughput ratio, and whether
every batched answer equals its solo answer.

    python bench/bench_serve.py                                  # embedded model, float32, 8 clients, 64 tokens
    python bench/bench_serve.py --dtype bfloat16
    python bench/bench_serve.py --url http://127.0.0.1:8000/v1 --model my-adapter --api_key KEY
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import torch

PROMPTS = [
    "Write a long, detailed story about a lighthouse keeper and a storm.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market in a large city, with every sound and smell.",
    "Write a long letter from a sailor to his family at home.",
    "Give a detailed history of the bicycle, from its invention to today.",
    "Tell a long fairy tale about a fox who wants to learn to fly.",
    "Describe, at length, how to bake bread at home, from flour to the first slice.",
    "Write a long essay about why people enjoy watching the sea.",
    "Explain in detail how plants turn sunlight into food.",
    "Write a long travel diary entry about crossing a desert by train.",
    "Describe the life of a honeybee from egg to old age, in detail.",
    "Write a long speech for the opening of a new public library.",
    "Explain at length how a city decides where to build new roads.",
    "Tell a long story about two friends who build a boat together.",
    "Describe in detail a day in the life of a mountain rescue team.",
    "Write a long review of an imaginary concert in a small village hall.",
]


@dataclass
class Answer:
    text: str
    completion_tokens: int
    latency: float  # seconds from sending the request to the last event
    first_token: float  # seconds from sending the request to the first content


def ask(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> Answer:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first_token, pieces, tokens = None, [], None
    with client.stream("POST", "/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    first_token = first_token or time.perf_counter() - started
                    pieces.append(choice["delta"]["content"])
    return Answer("".join(pieces), tokens, time.perf_counter() - started, first_token or float("nan"))


def run_clients(client: httpx.Client, model: str, prompts: list[str], max_tokens: int, at_once: bool):
    """Answers for every prompt, and the wall time: one after another, or all at once."""
    started = time.perf_counter()
    if at_once:
        gate = threading.Barrier(len(prompts))

        def together(prompt):
            gate.wait()
            return ask(client, model, prompt, max_tokens)

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(together, prompts))
    else:
        answers = [ask(client, model, prompt, max_tokens) for prompt in prompts]
    return answers, time.perf_counter() - started


def start_server(args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "lorafit", "serve", "--port", "0", "--log_level", "warning",
               "--max_batch_size", str(args.max_batch_size), "--dtype", args.dtype,
               "--served_model_name", args.model_name]
    if args.model:
        command += ["--model_name_or_path", args.model]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stderr:  # the server announces its address once it is ready
        found = re.search(r"at (http://\S+/v1)", line)
        if found:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep draining its log
            return process, found.group(1)
    raise RuntimeError(f"lorafit serve exited with {process.wait()} before announcing its address")


def cpu_description() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def row(label: str, answers: list[Answer], wall: float, same: str) -> str:
    tokens = sum(a.completion_tokens for a in answers)
    latencies = [a.latency for a in answers]
    first = [a.first_token for a in answers]
    return (f"| {label} | {tokens} | {wall:.1f} | {tokens / wall:.1f} | {statistics.mean(latencies):.2f} "
            f"/ {max(latencies):.2f} | {statistics.mean(first):.2f} / {max(first):.2f} | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=None, help="a running server's /v1 address (default: start one)")
    parser.add_argument("--model", default=None, help="model for the started server (default: the embedded one)")
    parser.add_argument("--model_name", default="bench", help="the served model id to request")
    parser.add_argument("--api_key", default=os.environ.get("LORAFIT_API_KEY"))
    parser.add_argument("--dtype", default="float32", help="--dtype of the started server")
    parser.add_argument("--max_batch_size", type=int, default=8, help="--max_batch_size of the started server")
    parser.add_argument("--clients", type=int, default=8, help="clients at once (at most %d)" % len(PROMPTS))
    parser.add_argument("--max_tokens", type=int, default=64, help="new tokens per answer")
    args = parser.parse_args()
    prompts = PROMPTS[:args.clients]

    process, url = (None, args.url) if args.url else start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 2)
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=600, limits=limits) as client:
            ask(client, args.model_name, "Hi", 4)  # warm-up: first-call allocations, lazy initialisation
            solo, solo_wall = run_clients(client, args.model_name, prompts, args.max_tokens, at_once=False)
            together, together_wall = run_clients(client, args.model_name, prompts, args.max_tokens, at_once=True)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)

    same = [a.text == b.text for a, b in zip(solo, together)]
    solo_rate = sum(a.completion_tokens for a in solo) / solo_wall
    together_rate = sum(a.completion_tokens for a in together) / together_wall
    print(f"server {url} ({'started here' if process else 'given'}), model {args.model or 'smollm2-135m-instruct'}, "
          f"{args.dtype}, max_batch_size {args.max_batch_size}; {cpu_description()}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}, commit {git_commit()}; {len(prompts)} prompts, "
          f"{args.max_tokens} new tokens each, greedy, ignore_eos\n")
    print("| clients | new tokens | wall s | tokens/s in all | latency s (mean / max) "
          "| first token s (mean / max) | answers equal the solo ones |")
    print("|---|---:|---:|---:|---:|---:|:---:|")
    print(row("1 (one request at a time)", solo, solo_wall, "-"))
    print(row(f"{len(prompts)} at once", together, together_wall, f"{sum(same)}/{len(same)}"))
    print(f"\n{len(prompts)} clients / 1 client: {together_rate / solo_rate:.2f}x tokens/s in all")
    for index, equal in enumerate(same):
        if not equal:
            print(f"prompt {index}: batched answer differs from the solo one\n  solo:    {solo[index].text!r}\n"
                  f"  batched: {together[index].text!r}")


if __name__ == "__main__":
    main()
