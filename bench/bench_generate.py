"""Generation speed: lorafit's KV-cached loop vs. a loop that recomputes the whole sequence each step.

For each answer length (default 32, 128, 512 new tokens) it generates greedily, from the same chat
prompt, with:
  cached      lorafit.infer.generate: the prompt once, then one token per step through the KV cache
  hf          transformers' `model.generate` (also KV-cached), for reference
  recompute   the seed's loop, as usually written: every step runs the model over prompt + everything
              generated so far and takes `logits[:, -1]`
  recompute, last logits only
              the same loop given `logits_to_keep=1`, so it is not also charged for projecting every
              position onto the vocabulary: a stronger baseline than the seed's, for a conservative ratio
and prints new tokens per second for each, the cached/recompute ratios, and whether all of them
produced the same tokens. Stop tokens are ignored so every run produces exactly N tokens.

    python bench/bench_generate.py                         # CPU, the embedded model, fp32
    python bench/bench_generate.py --device cuda --dtype bfloat16 --lengths 32 128 512 2048
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch

from lorafit.data.render import render_prompt
from lorafit.infer.generate import generate
from lorafit.infer.options import GenerationOptions
from lorafit.models import load_model, load_tokenizer, parse_dtype

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and a storm."}]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def cached(model, prompt, new_tokens):
    options = GenerationOptions(temperature=0, max_new_tokens=new_tokens)
    (completion,) = generate(model, [prompt], options, stop_token_ids=[])
    return completion.token_ids


@torch.inference_mode()
def hf_generate(model, prompt, new_tokens):
    input_ids = torch.tensor([prompt], device=model.device)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def recompute(model, prompt, new_tokens, last_logits_only=False):
    """No cache: step t feeds all len(prompt) + t tokens again (O(n^2) token passes for n tokens)."""
    ids = list(prompt)
    extra = {"logits_to_keep": 1} if last_logits_only else {}
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids], device=model.device), use_cache=False, **extra).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name}, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model (default: the embedded smollm2-135m-instruct)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512], help="new tokens per run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip_hf", action="store_true", help="leave out transformers' generate")
    args = parser.parse_args()

    device = torch.device(args.device)
    model = load_model(args.model, dtype=parse_dtype(args.dtype)).to(device).eval()
    tokenizer = load_tokenizer(args.model)
    prompt = render_prompt(tokenizer, PROMPT)
    cached(model, prompt, 8), recompute(model, prompt, 8)  # warm-up: allocator, kernels, lazy init

    print(f"model {args.model or 'smollm2-135m-instruct'} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"params, {args.dtype}), prompt {len(prompt)} tokens, greedy, device: {device_description(device)}, "
          f"torch {torch.__version__}, commit {git_commit()}\n")
    print("| new tokens | cached (lorafit) tok/s | transformers generate tok/s | recompute tok/s "
          "| recompute, last logits only, tok/s | cached / recompute | cached / recompute, last logits only "
          "| same tokens |")
    print("|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for n in args.lengths:
        ours, ours_s = timed(lambda: cached(model, prompt, n), device)
        if args.skip_hf:
            theirs, hf_cell = ours, "-"
        else:
            theirs, hf_s = timed(lambda: hf_generate(model, prompt, n), device)
            hf_cell = f"{n / hf_s:.1f}"
        naive, naive_s = timed(lambda: recompute(model, prompt, n), device)
        lean, lean_s = timed(lambda: recompute(model, prompt, n, last_logits_only=True), device)
        runs = (ours, theirs, naive, lean)
        same = "yes" if all(r == ours for r in runs) else f"no (first difference at {first_difference(*runs)})"
        print(f"| {n} | {n / ours_s:.1f} | {hf_cell} | {n / naive_s:.1f} | {n / lean_s:.1f} "
              f"| {naive_s / ours_s:.1f}x | {lean_s / ours_s:.1f}x | {same} |", flush=True)


def first_difference(*sequences) -> int:
    for position, tokens in enumerate(zip(*sequences)):
        if len(set(tokens)) > 1:
            return position
    return min(map(len, sequences))


if __name__ == "__main__":
    main()
