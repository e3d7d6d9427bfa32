"""LoRA variants side by side: plain LoRA, rsLoRA, DoRA, PiSSA, OLoRA and LoRA+ on the same data, steps and seed.

Each variant is one `lorafit train` command on the embedded model (r=16, alpha 32, all-linear,
dropout 0.05, batch 8, lr 2e-4, seed 42) over the same slice of `../shared/data/alpaca_en_demo.json`
(64 training records, 32 other records held out), run as its own process so its peak RSS is its
own (`wait4`). The table gives the mean training loss of the last 4 steps, the held-out loss at the
end, the seconds per step (`train_runtime / steps`) and the peak RSS, both relative to plain LoRA.
Only the LoRA flags differ between runs:

  plain     (none)                          rslora    --use_rslora (scaling alpha/sqrt(r): 8 instead of 2)
  dora      --use_dora                      pissa     --init_lora_weights pissa
  olora     --init_lora_weights olora       loraplus  --loraplus_lr_ratio 16

A second table times the adapter alone: forward + backward + AdamW step of plain LoRA and DoRA on
one fixed batch, interleaved round by round (as bench_train_step.py), which is DoRA's step cost
without the data pipeline and the run's start-up.

A third part trains the persona recipe once per variant: `examples/persona.yaml` (attention-only
r=16, lr 1e-3, 3 epochs, built-in replay) on lorafit's persona set plus the variant's flag, then
answers the held-out persona questions with the base model and every variant's adapter in one
`lorafit eval`, and prints what bench_persona.py measures (its functions, imported): name and maker
on 10 identity questions, distinct identity answers, general answers the base had right that are
still right ("kept"), general answers naming the persona ("leaks"), and the whole command's seconds.
The replay answers come from the lorafit cache (made by the first run when absent), so every run
trains the same tokens. With --work_dir and --reuse_adapters, adapters already trained there (by an
interrupted run, or by a second process given other --variants) are evaluated without training again.

    python bench/bench_variants.py                        # ~25 min + ~20 min (persona) on 2 CPU cores
    python bench/bench_variants.py --variants plain,dora --max_steps 8 --parts loss
    python bench/bench_variants.py --parts persona --work_dir /tmp/variants-persona
    python bench/bench_variants.py --parts persona --work_dir /tmp/variants-persona --reuse_adapters
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_persona import RECIPE, evaluate, figures, final_loss, persona_files, run_train

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
COMMON = ["--lora_rank", "16", "--lora_alpha", "32", "--lora_dropout", "0.05", "--target_modules", "all-linear",
          "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--learning_rate", "2e-4",
          "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no", "--seed", "42",
          "--cutoff_len", "384", "--disable_tqdm", "true"]
VARIANTS = {
    "plain": [],
    "rslora": ["--use_rslora"],
    "dora": ["--use_dora"],
    "pissa": ["--init_lora_weights", "pissa"],
    "olora": ["--init_lora_weights", "olora"],
    "loraplus": ["--loraplus_lr_ratio", "16"],
}


def write_data(folder: Path, train: int, heldout: int) -> tuple[Path, Path]:
    records = json.loads(DATA.read_text())
    train_file, heldout_file = folder / "train.json", folder / "heldout.json"
    train_file.write_text(json.dumps(records[:train]))
    heldout_file.write_text(json.dumps(records[-heldout:]))
    return train_file, heldout_file


def train(label: str, train_file: Path, heldout_file: Path, out: Path, max_steps: int, env: dict) -> dict:
    command = [sys.executable, "-m", "lorafit", "train", "--train_file", str(train_file), "--validation_file",
               str(heldout_file), *COMMON, *VARIANTS[label], "--max_steps", str(max_steps), "--output_dir", str(out)]
    log = out.parent / f"{label}.log"
    with log.open("w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{label}: lorafit train failed; see {log}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    runtime = [r["train_runtime"] for r in records if "train_runtime" in r][-1]  # the run's summary line
    eval_loss = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    return {"loss": statistics.mean(losses[-4:]), "eval_loss": eval_loss, "step_s": runtime / max_steps,
            "rss_mb": usage.ru_maxrss / 1024}


def adapter_step_cost(steps: int, batch: int, seq: int) -> dict[str, float]:
    """Median seconds of forward + backward + AdamW step, plain LoRA vs DoRA, interleaved."""
    import torch

    import lorafit
    from lorafit.models import load_model, resolve_model_path
    from lorafit.train.trained_token_loss import use_trained_token_loss

    path = resolve_model_path(None)
    models = {}
    for label, dora in (("plain", False), ("dora", True)):
        model = load_model(path, dtype=torch.float32)
        model.config.use_cache = False
        lorafit.add_lora(model, lorafit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                   use_dora=dora))
        use_trained_token_loss(model)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        models[label] = (model, optimizer)
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (batch, seq))
    times = {label: [] for label in models}

    def step(model, optimizer):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for model, optimizer in models.values():
        step(model, optimizer)
    for _ in range(steps):
        for label, (model, optimizer) in models.items():
            started = time.perf_counter()
            step(model, optimizer)
            times[label].append(time.perf_counter() - started)
    return {label: statistics.median(values) for label, values in times.items()}


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def loss_part(args: argparse.Namespace, labels: list[str], env: dict) -> None:
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        work = Path(tmp)
        train_file, heldout_file = write_data(work, args.train_records, args.heldout_records)
        for label in labels:
            results[label] = train(label, train_file, heldout_file, work / label, args.max_steps, env)
            print(f"{label}: {results[label]}", file=sys.stderr, flush=True)
    plain = results["plain"]
    machine = f"{os.cpu_count()}-core {platform.machine()}"
    print(f"\nLoRA variants, embedded model (SmolLM2-135M), {machine}, commit {commit()}: "
          f"{args.train_records} alpaca records, {args.max_steps} steps of batch 8, r=16 all-linear, lr 2e-4, seed 42; "
          f"held-out loss on {args.heldout_records} other records\n")
    print("| variant | final train loss (last 4 steps) | held-out loss | s/step (x plain) | peak RSS MB (x plain) |")
    print("|---|---:|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['loss']:.4f} | {r['eval_loss']:.4f} | {r['step_s']:.2f} ({r['step_s'] / plain['step_s']:.2f}x) "
              f"| {r['rss_mb']:,.0f} ({r['rss_mb'] / plain['rss_mb']:.2f}x) |")
    if args.step_rounds > 0:
        cost = adapter_step_cost(args.step_rounds, batch=8, seq=256)
        print(f"\nadapter step alone (forward + backward + AdamW, batch 8 x 256 tokens, median of {args.step_rounds} "
              f"interleaved rounds): plain LoRA {cost['plain']:.2f} s, DoRA {cost['dora']:.2f} s "
              f"({cost['dora'] / cost['plain']:.3f}x)")


def persona_part(args: argparse.Namespace, labels: list[str], env: dict) -> None:
    """The persona recipe with each variant's flag on top, then one `lorafit eval` of all the adapters."""
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-variants-persona-"))
    work.mkdir(parents=True, exist_ok=True)
    train_file, prompts = persona_files(work, args.name, args.author)
    seconds = train_persona_adapters(labels, train_file, work, env, args.reuse_adapters)
    print("evaluating ...", file=sys.stderr, flush=True)
    report = evaluate(prompts, [work / label for label in labels], work / "eval", env, args.max_new_tokens)
    made_replay = [label for label in labels if "replay: using the base model's cached" not in
                   (work / f"{label}.log").read_text()]
    print(f"\npersona '{args.name}' by '{args.author}' with examples/persona.yaml plus each variant's flag, "
          f"embedded model, {os.cpu_count()}-core {platform.machine()}, commit {commit()}; greedy, "
          f"{args.max_new_tokens} tokens; train s is the whole command, indicative only"
          + (f" ({', '.join(made_replay)} also generated the replay answers)" if made_replay else "") + "\n")
    print("| variant | name | maker | distinct identity | general kept | leaks (in kept set) | final loss | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label in labels:
        f = figures(report, label)
        n, right = f["identity"], f["base_right"]
        kept = f"{f['kept']}/{right} ({100 * f['kept'] / right:.0f}%)" if right else "-"
        loss = final_loss(work / label)
        print(f"| {label} | {f['name']}/{n} | {f['maker']}/{n} | {f['distinct']}/{n} | {kept} | "
              f"{f['leaks']}/{f['general']} ({f['leaks_base_right']}) | {'-' if loss is None else f'{loss:.3f}'} | "
              f"{seconds.get(label, float('nan')):.0f} |")
    print(f"\nanswers side by side: {work / 'eval' / 'eval.md'}")


def train_persona_adapters(labels: list[str], train_file: Path, work: Path, env: dict, reuse: bool) -> dict:
    """Train WORK/<variant> for each label; the seconds of every run so far, kept in WORK/train_seconds.json
    so that a later --reuse_adapters run still prints them."""
    seconds_file = work / "train_seconds.json"
    for label in labels:
        if reuse and (work / label / "adapter_model.safetensors").is_file():
            print(f"persona recipe, {label}: using the adapter already in {work / label}", file=sys.stderr, flush=True)
            continue
        print(f"persona recipe, {label} ...", file=sys.stderr, flush=True)
        took = run_train(label, [str(RECIPE), "--train_file", str(train_file), *VARIANTS[label]], work / label, env)
        print(f"  {took:.0f} s", file=sys.stderr, flush=True)
        seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
        seconds_file.write_text(json.dumps({**seconds, label: took}))
    return json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--parts", default="loss,persona",
                        help="comma-separated: loss (alpaca losses, s/step, RSS, adapter step), persona (the recipe)")
    parser.add_argument("--max_steps", type=int, default=16, help="optimizer steps per variant (16 = 2 epochs)")
    parser.add_argument("--train_records", type=int, default=64)
    parser.add_argument("--heldout_records", type=int, default=32)
    parser.add_argument("--step_rounds", type=int, default=6, help="timed rounds of the adapter-only comparison (0: skip)")
    parser.add_argument("--name", default="Kestrel", help="persona part: the persona's name")
    parser.add_argument("--author", default="Ardent Works", help="persona part: the persona's maker")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="persona part: answer length in the eval")
    parser.add_argument("--work_dir", default=None,
                        help="persona part: where adapters, logs and eval go (default: a temporary folder, kept)")
    parser.add_argument("--reuse_adapters", action="store_true",
                        help="persona part: evaluate a variant's adapter already in --work_dir, not train it again")
    args = parser.parse_args()
    labels = args.variants.split(",")
    unknown = [label for label in labels if label not in VARIANTS]
    parts = args.parts.split(",")
    if not parts or any(part not in ("loss", "persona") for part in parts):
        sys.exit(f"--parts: choose among loss, persona; got {args.parts}")
    if unknown or ("loss" in parts and "plain" not in labels):
        sys.exit(f"--variants: choose among {', '.join(VARIANTS)}, plain included for the loss part (the reference); "
                 f"got {unknown}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if "loss" in parts:
        loss_part(args, labels, env)
    if "persona" in parts:
        persona_part(args, labels, env)


if __name__ == "__main__":
    main()
