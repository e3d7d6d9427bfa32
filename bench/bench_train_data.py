"""A real training job, end to end: HF Trainer + PEFT vs `lorafit train` (with and without packing).

Each job runs in its own process, one after another, on the same data slice and settings (batch
8, r=16 all-linear, dropout 0.05, lr 2e-4, fp32), and the script prints, side by side:

  hf_peft          transformers.Trainer + peft.get_peft_model, dynamic padding
                   (DataCollatorForSeq2Seq), the same tokenized examples lorafit trains on;
                   its time is *training only* (Trainer's train_runtime): loading, tokenizing and
                   start-up are not counted, in the peer's favour
  lorafit          `lorafit train` (the whole command: start-up, tokenizing, training, saving)
  lorafit_packing  `lorafit train --packing` (the whole command)

with each job's peak resident memory (RSS of its process, from the kernel's accounting), and the
ratios: the peer's training time over ours, our peak RSS over the peer's.

    python bench/bench_train_data.py                                  # 64 alpaca examples, 1 epoch
    python bench/bench_train_data.py --examples 32 --jobs hf_peft,lorafit    # the memory job
    python bench/bench_train_data.py --data identity --epochs 3 --lr 5e-4 --jobs hf_peft,lorafit
    python bench/bench_train_data.py --data persona --examples 0 --epochs 3 --lr 5e-4 --jobs hf_peft,lorafit
    python bench/bench_train_data.py --bf16 --examples 999 --batch 16           # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALPACA = HERE.parent.parent / "shared" / "data" / "alpaca_en_demo.json"
RESULT_MARK = "BENCH_RESULT "


def write_data(args, folder: Path) -> Path:
    if args.data in ("identity", "persona"):
        from lorafit.demo import DEFAULT_AUTHOR, DEFAULT_NAME, TRAIN_RESOURCE, identity_records, write_jsonl

        resource = TRAIN_RESOURCE if args.data == "identity" else "persona.jsonl"
        records = identity_records(resource, DEFAULT_NAME, DEFAULT_AUTHOR)
        return write_jsonl(records[: args.examples] if args.examples else records, folder / f"{args.data}.jsonl")
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))[: args.examples]
    path = folder / "data.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def common_flags(args) -> list[str]:
    flags = ["--per_device_train_batch_size", str(args.batch), "--num_train_epochs", str(args.epochs),
             "--learning_rate", str(args.lr), "--lora_rank", str(args.rank), "--lora_alpha", str(2 * args.rank),
             "--seed", "42"]
    return flags + (["--bf16", "true"] if args.bf16 else [])


def job_command(job: str, args, data: Path, output: Path) -> list[str]:
    if job == "hf_peft":
        return [sys.executable, __file__, "--run_peer", "--train_file", str(data), "--output", str(output),
                *common_flags(args)]
    command = [sys.executable, "-m", "lorafit", "train", "--train_file", str(data), "--output_dir", str(output),
               "--target_modules", "all-linear", "--lora_dropout", "0.05", "--logging_steps", "1",
               "--save_strategy", "no", "--report_to", "none", *common_flags(args)]
    return command + (["--packing", "true"] if job == "lorafit_packing" else [])


def run_job(job: str, args, data: Path, folder: Path) -> dict:
    """Wall time, training time and peak RSS of one job, run as a child process."""
    command = job_command(job, args, data, folder / job)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "TQDM_DISABLE": "1"})
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS, not the maximum over all children
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{job} failed (exit {process.returncode}):\n{output[-4000:]}")
    train_seconds = None
    for line in output.splitlines():
        if line.startswith(RESULT_MARK):
            train_seconds = json.loads(line[len(RESULT_MARK):])["train_runtime"]
        elif line.startswith("trained in "):
            train_seconds = float(line.split()[2].rstrip("s;"))
    return {"job": job, "wall": wall, "train": train_seconds, "peak_rss_gb": usage.ru_maxrss / 2**20}


def run_peer(argv: list[str]) -> None:
    """The HF Trainer + PEFT job (run in a child process by `run_job`)."""
    parser = argparse.ArgumentParser()
    for flag in ("--train_file", "--output", "--per_device_train_batch_size", "--num_train_epochs",
                 "--learning_rate", "--lora_rank", "--lora_alpha", "--seed", "--bf16"):
        parser.add_argument(flag)
    args = parser.parse_args(argv)
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lorafit.data.args import DataArguments
    from lorafit.data.pipeline import build_datasets
    from lorafit.models import load_tokenizer, resolve_model_path

    warnings.simplefilter("ignore")
    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    train = build_datasets(DataArguments(train_file=[args.train_file]), tokenizer).train  # the same examples
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=int(args.lora_rank), lora_alpha=float(args.lora_alpha),
                                             lora_dropout=0.05, target_modules="all-linear"))
    training = TrainingArguments(
        output_dir=args.output, per_device_train_batch_size=int(args.per_device_train_batch_size),
        num_train_epochs=float(args.num_train_epochs), learning_rate=float(args.learning_rate), seed=int(args.seed),
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, bf16=bool(args.bf16),
        use_cpu=not torch.cuda.is_available(),  # the Trainer refuses bf16 without a GPU unless told it is a CPU run
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    result = Trainer(model=model, args=training, train_dataset=train, data_collator=collator).train()
    print(RESULT_MARK + json.dumps({"train_runtime": result.metrics["train_runtime"]}), flush=True)


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=HERE).strip()
    except Exception:
        return "unknown"


def main() -> None:
    if "--run_peer" in sys.argv:
        return run_peer([a for a in sys.argv[1:] if a != "--run_peer"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ALPACA), help="an Alpaca-format JSON file, 'identity' (lorafit's 60 English identity records) or 'persona' "
                             "(its 80-record persona set, 45 English and 35 Chinese)")
    parser.add_argument("--examples", type=int, default=64, help="first N records (0: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--jobs", default="hf_peft,lorafit,lorafit_packing")
    args = parser.parse_args()

    import torch
    import transformers

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_data_") as tmp:
        folder = Path(tmp)
        data = write_data(args, folder)
        for job in args.jobs.split(","):
            results.append(run_job(job, args, data, folder))
            print(f"  {job}: {results[-1]}", flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\ndevice: {device} | data: {Path(args.data).name} x {args.examples or 'all'} "
          f"| batch {args.batch} | epochs {args.epochs:g} | r={args.rank} all-linear | {'bf16' if args.bf16 else 'fp32'} "
          f"| torch {torch.__version__} | transformers {transformers.__version__} | commit {commit()}")
    peer = next((r for r in results if r["job"] == "hf_peft"), None)
    print(f"{'job':<16} {'command s':>10} {'training s':>11} {'peak RSS GB':>12} {'peer train / ours':>18} {'RSS / peer':>11}")
    for r in results:
        ours = r["wall"] if r["job"] != "hf_peft" else r["train"]
        speed = f"{peer['train'] / ours:.2f}x" if peer and r is not peer else "-"
        memory = f"{r['peak_rss_gb'] / peer['peak_rss_gb']:.2f}" if peer and r is not peer else "-"
        train = f"{r['train']:.1f}" if r["train"] is not None else "-"
        print(f"{r['job']:<16} {r['wall']:10.1f} {train:>11} {r['peak_rss_gb']:12.2f} {speed:>18} {memory:>11}")
    print("(peer train / ours: the peer's training time over our whole command for lorafit jobs)")


if __name__ == "__main__":
    main()
