"""Several adapters in one server: what a mixed batch costs against one adapter per batch.

On the embedded model (or `--model_name_or_path`), makes `--adapters` random LoRA adapters
(r=16, all-linear, non-zero B: the arithmetic is that of trained ones), then runs the same greedy
workload through the batching engine of `lorafit serve` in four ways, side by side in one process:

  merged, one adapter   what `lorafit serve --adapter DIR` does: the adapter folded into the weights
                        (the floor: no adapter arithmetic at all); every request uses adapter 0
  switch, one adapter   the several-adapter server, every request for adapter 0 (unmerged
                        single-adapter path, `lorafit.lora.multi`)
  mixed batch           the several-adapter server, requests spread over every adapter, all in one
                        running batch (per-row gathered A/B)
  adapter by adapter    the several-adapter server without mixing: each adapter's requests as their
                        own batch, one after the other (what a server that cannot mix rows must do)

Every request asks for `--max_new_tokens` with the stop tokens off, so each run produces the same
number of tokens. Prints new tokens per second and the ratio to the merged floor, the memory one
server with n adapters needs against n merged copies, and whether each mixed-batch answer equals
its adapter's answer alone.

    python bench/bench_serve_adapters.py                  # embedded model, 4 adapters, 16 requests x 64 tokens
    python bench/bench_serve_adapters.py --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain how a steam engine works, step by step.",
    "Describe a walk through a busy market in a large city.",
    "Write a long letter from a sailor to his family at home.",
    "Give a history of the bicycle, from its invention to today.",
    "Tell a fairy tale about a fox who wants to learn to fly.",
    "Describe how to bake bread at home, from flour to the first slice.",
    "Write an essay about why people enjoy watching the sea.",
]


def make_adapters(base: str, count: int, folder: Path, rank: int) -> dict[str, Path]:
    import lorafit

    adapters = {}
    for index in range(count):
        model = lorafit.models.load_model(base)
        lorafit.add_lora(model, lorafit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                   init_lora_weights=False))
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        adapters[f"a{index}"] = lorafit.save_adapter(model, folder / f"a{index}", base_model_name_or_path=base)
        del model
    return adapters


def run(loaded, jobs: list[tuple[list[int], str | None]], options, batch_size: int, waves: list[list[int]] | None = None):
    """Tokens per second of answering `jobs` (prompt, adapter) with one engine; `waves`: groups of job
    indices run one after the other (default: all together). Returns (tok/s, texts)."""
    from lorafit.infer.engine import BatchingEngine

    engine = BatchingEngine(loaded.model, loaded.tokenizer, pad_token_id=loaded.tokenizer.pad_token_id,
                            max_batch_size=batch_size)
    texts: list[str | None] = [None] * len(jobs)
    tokens = 0
    start = time.perf_counter()
    for wave in waves or [list(range(len(jobs)))]:
        requests = {i: engine.submit(jobs[i][0], options, stop_token_ids=(), adapter_id=jobs[i][1]) for i in wave}
        engine.run_until_idle()
        for i, request in requests.items():
            completion = request.done.result()
            texts[i], tokens = completion.text, tokens + completion.completion_tokens
    return tokens / (time.perf_counter() - start), texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="default: the embedded model")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each way (median)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from lorafit.data.render import render_prompt
    from lorafit.infer.loading import load_for_inference, load_with_adapters
    from lorafit.infer.options import GenerationOptions
    from lorafit.models import resolve_model_path

    torch.manual_seed(0)
    base = resolve_model_path(args.model_name_or_path)
    options = GenerationOptions(temperature=0, max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as folder:
        adapters = make_adapters(base, args.adapters, Path(folder), args.rank)
        names = list(adapters)
        merged = load_for_inference(base, str(adapters[names[0]]), dtype=args.dtype, device=args.device)
        multi = load_with_adapters(base, adapters, dtype=args.dtype, device=args.device)
    prompts = [render_prompt(multi.tokenizer, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
               for i in range(args.requests)]
    one = [(p, names[0]) for p in prompts]
    spread = [(p, names[i % len(names)]) for i, p in enumerate(prompts)]
    by_adapter = [[i for i, (_, n) in enumerate(spread) if n == name] for name in names]
    ways = {
        "merged, one adapter (floor)": lambda: run(merged, [(p, None) for p in prompts], options, args.batch_size),
        "switch, one adapter": lambda: run(multi, one, options, args.batch_size),
        f"mixed batch, {len(names)} adapters": lambda: run(multi, spread, options, args.batch_size),
        f"adapter by adapter, {len(names)} batches": lambda: run(multi, spread, options, args.batch_size, by_adapter),
    }
    run(multi, spread[:2], options.updated(max_new_tokens=4), 2)  # warm-up
    rates: dict[str, list[float]] = {way: [] for way in ways}
    texts = {}
    for _ in range(args.rounds):  # interleaved, so drift on the machine hits every way alike
        for way, call in ways.items():
            rate, texts[way] = call()
            rates[way].append(rate)

    floor = statistics.median(rates["merged, one adapter (floor)"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else platform.processor() or "cpu"
    print(f"\n{args.requests} requests x {args.max_new_tokens} tokens, batch {args.batch_size}, {len(names)} adapters "
          f"r={args.rank} all-linear, {device}, torch {torch.__version__}, commit {commit}, median of {args.rounds}\n")
    print("| way | new tokens/s | x merged floor |\n|---|---:|---:|")
    for way in ways:
        rate = statistics.median(rates[way])
        print(f"| {way} | {rate:.1f} | {rate / floor:.2f}x |")

    mixed = texts[f"mixed batch, {len(names)} adapters"]
    alone = texts[f"adapter by adapter, {len(names)} batches"]
    same = sum(a == b for a, b in zip(mixed, alone))
    print(f"\nmixed-batch answers equal to each adapter's own batch: {same}/{len(mixed)}")
    base_bytes = sum(p.numel() * p.element_size() for p in merged.model.parameters())
    lora_bytes = sum(p.numel() * p.element_size() for n, p in multi.model.named_parameters() if "lora_" in n)
    print(f"weights: one server with {len(names)} adapters {(base_bytes + lora_bytes) / 1e9:.3f} GB; "
          f"{len(names)} merged copies {len(names) * base_bytes / 1e9:.3f} GB")


if __name__ == "__main__":
    main()
