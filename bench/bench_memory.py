"""Where a training step's memory goes: lorafit vs HF + PEFT on the same batch, measured, not guessed.

For one batch (the longest batch of the memory job: 8 alpaca examples, dynamic padding), each
variant runs one forward + backward in a fresh process, and the script reports:

  process + libraries   RSS after importing torch/transformers/peft (before the model)
  model weights         RSS added by loading the model and attaching the adapter
  saved for backward    bytes of the distinct tensors autograd keeps between forward and backward
                        (torch.autograd.graph.saved_tensors_hooks), split into [tokens x vocab]
                        logit-sized tensors and the rest (activations, masks, dropout copies)
  step peak             the process's peak RSS during the step (kernel accounting)

    python bench/bench_memory.py                 # 8 alpaca examples, batch 8, r=16 all-linear, dropout 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALPACA = HERE.parent.parent / "shared" / "data" / "alpaca_en_demo.json"
MARK = "MEMORY_RESULT "


def rss_gb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(variant: str, args) -> dict:
    import torch

    import lorafit
    from lorafit.data.args import DataArguments
    from lorafit.data.collate import PaddingCollator
    from lorafit.data.pipeline import build_datasets
    from lorafit.models import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))[: args.examples]
    data_file = Path(args.tmp) / "data.json"
    data_file.write_text(json.dumps(records))
    examples = build_datasets(DataArguments(train_file=[str(data_file)]), tokenizer).train
    features = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    batch = PaddingCollator(tokenizer.pad_token_id)(features)
    import peft  # noqa: F401  (both variants pay for the same imports)

    result = {"variant": variant, "tokens": int(batch["attention_mask"].sum()), "padded": batch["input_ids"].numel(),
              "libraries_gb": rss_gb()}
    model = load_model(path, dtype=torch.float32)
    model.config.use_cache = False
    if variant == "hf_peft":
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                           lora_dropout=0.05, target_modules="all-linear"))
    else:
        from lorafit.train.attention import use_training_attention
        from lorafit.train.trained_token_loss import use_trained_token_loss

        use_training_attention(model)
        lorafit.add_lora(model, lorafit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
        use_trained_token_loss(model)
    model.train()
    result["weights_gb"] = rss_gb() - result["libraries_gb"]

    seen, saved = set(), {"logits": 0, "other": 0}
    vocab = model.config.vocab_size

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and not isinstance(tensor, torch.nn.Parameter):
            seen.add(key)
            saved["logits" if tensor.shape and tensor.shape[-1] == vocab and tensor.dim() >= 2
                  and tensor.numel() >= vocab * 64 else "other"] += storage.nbytes()
        return tensor

    before_step = rss_gb()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    result.update(saved_logits_gb=saved["logits"] / 2**30, saved_other_gb=saved["other"] / 2**30,
                  before_step_gb=before_step, peak_gb=peak_gb())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ALPACA))
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(MARK + json.dumps(measure(args.variant, args)), flush=True)
        return
    import tempfile

    rows = []
    for variant in ("hf_peft", "lorafit"):
        with tempfile.TemporaryDirectory() as tmp:
            output = subprocess.run([sys.executable, __file__, "--variant", variant, "--tmp", tmp, "--data", args.data,
                                     "--examples", str(args.examples)], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(line for line in output.splitlines() if line.startswith(MARK))[len(MARK):]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    print(f"\none batch of {args.examples} alpaca examples: {rows[0]['tokens']} real tokens, padded to {rows[0]['padded']} "
          f"| r=16 all-linear, dropout 0.05, fp32 | commit {commit}")
    print(f"{'GB':<24}" + "".join(f"{row['variant']:>12}" for row in rows))
    for key, label in (("libraries_gb", "process + libraries"), ("weights_gb", "model weights + adapter"),
                       ("saved_logits_gb", "saved: logit-sized"), ("saved_other_gb", "saved: activations etc."),
                       ("peak_gb", "step peak RSS")):
        print(f"{label:<24}" + "".join(f"{row[key]:12.2f}" for row in rows))


if __name__ == "__main__":
    main()
