"""Training-step cost of lorafit's LoRA layer vs. PEFT's, against the frozen-model floor, in one run.

Each variant runs the same forward + backward + optimizer step on the same model and batch:
  floor    the base model, frozen, with gradients flowing to the input embeddings only: the work
           every LoRA method must do at least (activation gradients through every layer)
  lorafit  lorafit.add_lora, target all-linear, with lorafit train's loss (head and loss at trained
           positions only, chunked: `lorafit.train.trained_token_loss`); every position is trained here
  lorafit_plain  (only when asked for: --variants floor,lorafit,lorafit_plain) lorafit with its
           layers on autograd's plain path instead of one fused node per layer (lorafit/lora/fused.py)
  peft     peft.get_peft_model with the same LoraConfig (PEFT's defaults: fp32 adapters, autocast)
and prints the median step time, tokens/s and peak memory, with ratios to the floor and between us
and PEFT. Timings interleave the variants round by round so drift hits all of them alike.

On a CPU the floor's own time moves by up to 15% from one process to the next (its full-logits
loss allocates fresh 100 MB tensors each step, and where they land differs per process), while
staying steady within one; `--processes N` runs the whole comparison in N fresh processes one
after another and prints each one's figures and their medians.

    python bench/bench_train_step.py                      # CPU, the embedded model, fp32
    python bench/bench_train_step.py --processes 5        # the same in 5 fresh processes, medians
    python bench/bench_train_step.py --device cuda --dtype bfloat16 --model random-1b --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings

import torch

import lorafit
from lorafit.models import load_model
from lorafit.train.trained_token_loss import use_trained_token_loss


def build_model(name: str, dtype: torch.dtype, device: str, attn: str | None):
    if name.startswith("random-"):
        from transformers import LlamaConfig, LlamaForCausalLM

        sizes = {"random-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8),
                 "random-tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=4)}[name]
        config = LlamaConfig(vocab_size=49152, max_position_embeddings=4096, **sizes)
        if attn:
            config._attn_implementation = attn
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(dtype=dtype, device=device)
    return load_model(name, dtype=dtype, attn_implementation=attn).to(device)


def make_variant(kind: str, args, dtype, device):
    model = build_model(args.model, dtype, device, args.attn)
    model.config.use_cache = False
    if kind == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        params = []
    elif kind in ("lorafit", "lorafit_plain"):
        lorafit.add_lora(model, lorafit.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                                                   target_modules="all-linear"))
        lorafit.lora.use_fused(model, kind == "lorafit")
        if not args.model_loss:
            use_trained_token_loss(model)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank,
                                                               lora_dropout=args.dropout, target_modules="all-linear"))
        params = [p for p in model.parameters() if p.requires_grad]
    if args.grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}) \
            if hasattr(model, "activation_checkpointing_enable") else model.gradient_checkpointing_enable()
    model.train()
    # fused AdamW (CPU and CUDA), the Trainer's default optimizer (adamw_torch_fused) with torch >= 2.8
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    return model, optimizer


def step(model, optimizer, batch, device, autocast_dtype):
    with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--autocast", action="store_true", help="run under torch.autocast(dtype) as the Trainer's --bf16 does")
    parser.add_argument("--attn", default=None, help="attn_implementation, e.g. sdpa")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05, help="lora_dropout of both LoRA variants")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--grad_ckpt", action="store_true")
    parser.add_argument("--variants", default="floor,lorafit,peft")
    parser.add_argument("--model_loss", action="store_true", help="lorafit with the model's own loss (full logits)")
    parser.add_argument("--processes", type=int, default=1, help="repeat the comparison in this many fresh processes")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one process's figures, for --processes
    args = parser.parse_args()
    if args.processes > 1:
        return across_processes(args)
    dtype = getattr(torch, args.dtype)
    autocast_dtype = dtype if args.autocast and dtype != torch.float32 else None
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), device=args.device)
    batch = {"input_ids": ids, "labels": ids}

    kinds = args.variants.split(",")
    variants = {kind: make_variant(kind, args, dtype, args.device) for kind in kinds}
    times = {kind: [] for kind in kinds}
    peak = {}
    for kind in kinds:
        model, optimizer = variants[kind]
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            step(model, optimizer, batch, args.device, autocast_dtype)
        sync(args.device)
        peak[kind] = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    for _ in range(args.steps):  # interleaved rounds
        for kind in kinds:
            model, optimizer = variants[kind]
            sync(args.device)
            start = time.perf_counter()
            step(model, optimizer, batch, args.device, autocast_dtype)
            sync(args.device)
            times[kind].append(time.perf_counter() - start)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ndevice: {device_name} | model: {args.model} | dtype: {args.dtype}{' +autocast' if autocast_dtype else ''} "
          f"| batch {args.batch} x seq {args.seq} | rank {args.rank} all-linear, dropout {args.dropout:g} | grad ckpt {args.grad_ckpt} "
          f"| lorafit loss: {'model' if args.model_loss else 'trained-token'} "
          f"| torch {torch.__version__} | commit {commit()}")
    floor = statistics.median(times["floor"]) if "floor" in times else None
    print(f"{'variant':<13} {'step ms':>9} {'tokens/s':>10} {'x floor':>8} {'peak GiB':>9}")
    for kind in kinds:
        median = statistics.median(times[kind])
        ratio = f"{median / floor:8.3f}" if floor else "       -"
        print(f"{kind:<13} {median * 1e3:9.1f} {args.batch * args.seq / median:10.0f} {ratio} {peak[kind]:9.2f}")
    if "lorafit" in times and "peft" in times:
        speedup = statistics.median(times["peft"]) / statistics.median(times["lorafit"])
        print(f"peft / lorafit step time: {speedup:.3f}  (>1 means lorafit is faster)")
    if "lorafit" in times and "lorafit_plain" in times:
        gain = statistics.median(times["lorafit_plain"]) / statistics.median(times["lorafit"])
        print(f"lorafit_plain / lorafit step time: {gain:.3f}  (what the fused node saves)")
    if args.json:
        print("JSON " + json.dumps({kind: statistics.median(values) for kind, values in times.items()}))


def without_processes(argv: list[str]) -> list[str]:
    """ARGV less `--processes N` / `--processes=N`: what each child process runs with."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            kept.append(arg)
    return kept


def across_processes(args) -> None:
    """The comparison in `args.processes` fresh processes, one after another: each one's medians, then theirs."""
    forwarded = without_processes(sys.argv[1:])
    runs = []
    for index in range(args.processes):
        done = subprocess.run([sys.executable, __file__, *forwarded, "--json"], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"process {index + 1} failed:\n{done.stderr[-2000:]}")
        lines = done.stdout.splitlines()
        runs.append(json.loads(next(line for line in lines if line.startswith("JSON "))[5:]))
        if index == 0:
            print(next(line for line in lines if line.startswith("device:")))
    kinds = list(runs[0])
    ratios = [(label, a, b) for label, a, b in (("lorafit x floor", "lorafit", "floor"), ("peft / lorafit", "peft", "lorafit"),
                                                ("plain / fused", "lorafit_plain", "lorafit"))
              if a in kinds and b in kinds]
    widths = {kind: max(12, len(kind) + 5) for kind in kinds}
    print("process " + "".join(f"{kind + ' ms':>{widths[kind]}}" for kind in kinds) + "".join(f"{label:>16}" for label, _, _ in ratios))

    def row(label, figures):
        return (f"{label:<8}" + "".join(f"{figures[kind] * 1e3:{widths[kind]}.1f}" for kind in kinds)
                + "".join(f"{figures[a] / figures[b]:16.3f}" for _, a, b in ratios))

    for index, figures in enumerate(runs):
        print(row(str(index + 1), figures))
    medians = {kind: statistics.median(r[kind] for r in runs) for kind in kinds}
    print(row("median", medians) + "   (step times: median per variant)")
    for label, a, b in ratios:
        print(f"{label}, median of the per-process ratios: {statistics.median(r[a] / r[b] for r in runs):.3f}")

if __name__ == "__main__":
    main()
