"""LoRA fine-tuning in plain PyTorch: the pieces `lorafit train` uses, with every step in sight.

    python examples/train_plain_torch.py --train_file data.jsonl --output_dir outputs/plain

The data pipeline (`lorafit.data`) turns records into `input_ids` and `labels` (-100 where the model
is not trained: prompts, system text, padding) and batches them; the LoRA core (`lorafit.add_lora`)
wraps the base model's linear layers in place and freezes everything else. What the Trainer hides
is written out below: AdamW over the adapter's parameters, a warm-up + cosine schedule, gradient
accumulation with the loss averaged over the trained tokens of the whole optimizer step, gradient
clipping, a tqdm bar, a metrics log, and the adapter saved in PEFT's layout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import lorafit
from lorafit.data.args import DataArguments
from lorafit.data.collate import build_collator
from lorafit.data.pipeline import build_datasets
from lorafit.data.templates import set_chat_template
from lorafit.models import EMBEDDED_MODEL, load_model, load_tokenizer, resolve_model_path

IGNORE_INDEX = -100


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=EMBEDDED_MODEL)
    parser.add_argument("--train_file", action="append", required=True, help="repeatable")
    parser.add_argument("--output_dir", default="outputs/plain-torch")
    parser.add_argument("--template", default="auto", help="chat template (see lorafit train --help)")
    parser.add_argument("--cutoff_len", type=int, default=1024)
    parser.add_argument("--num_train_epochs", type=float, default=1.0)
    parser.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides epochs when > 0")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--warmup_ratio", type=float, default=0.03)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=32.0)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--target_modules", default="all-linear", help="'all-linear' or a comma list")
    parser.add_argument("--logging_steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear from 0 to 1 over the warm-up, then a half cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def trained_tokens(labels: torch.Tensor) -> int:
    """Positions that are predicted and scored: label[t + 1] is predicted from position t."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_loss(model, batch: dict) -> torch.Tensor:
    """Sum (not mean) of the next-token cross-entropy over the trained tokens of one micro-batch.

    Summing here and dividing by the step's token count below weighs every trained token the same,
    however the tokens are spread over micro-batches. The logits are upcast to float32 for the
    softmax only (the one dtype rule for the loss).
    """
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def micro_batches_per_step(loader: DataLoader, accumulation: int):
    """Group the loader's batches into the micro-batches of each optimizer step."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accumulation:
            yield group
            group = []
    if group:
        yield group


def train(args: argparse.Namespace) -> Path:
    seed_everything(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # Data: records -> conversations -> input_ids / labels -> padded batches.
    model_path = resolve_model_path(args.model_name_or_path)
    tokenizer = set_chat_template(load_tokenizer(model_path), args.template)
    data_args = DataArguments(train_file=args.train_file, template=args.template, cutoff_len=args.cutoff_len)
    prepared = build_datasets(data_args, tokenizer, str(output_dir), seed=args.seed)
    print(prepared.summary.format())
    loader = DataLoader(prepared.train, batch_size=args.batch_size, shuffle=True,
                        collate_fn=build_collator(data_args, tokenizer),
                        generator=torch.Generator().manual_seed(args.seed))

    # Model: the frozen base plus trainable low-rank adapters.
    model = load_model(model_path)
    lorafit.add_lora(model, lorafit.LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(","),
    ))
    lorafit.print_trainable_parameters(model)
    model.train()

    # Optimizer and schedule, over the adapter's parameters only.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps))

    metrics_file = (output_dir / "metrics.jsonl").open("w", encoding="utf-8")
    bar = tqdm(total=total_steps, desc="training", dynamic_ncols=True)
    step, started = 0, time.perf_counter()
    while step < total_steps:
        for group in micro_batches_per_step(loader, args.gradient_accumulation_steps):
            tokens_in_step = sum(trained_tokens(batch["labels"]) for batch in group)
            step_loss = 0.0
            for batch in group:
                loss = summed_loss(model, batch) / max(tokens_in_step, 1)
                loss.backward()  # gradients add up over the micro-batches
                step_loss += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % args.logging_steps == 0 or step == total_steps:
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": step_loss,
                          "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "elapsed_s": round(time.perf_counter() - started, 2)}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if step >= total_steps:
                break
    bar.close()
    metrics_file.close()

    # The adapter in PEFT's layout, and the tokenizer with the chat template it was trained under.
    lorafit.save_adapter(model, output_dir, base_model_name_or_path=model_path)
    tokenizer.save_pretrained(output_dir)
    print(f"saved the adapter to {output_dir}")
    return output_dir


if __name__ == "__main__":
    train(parse_args())
