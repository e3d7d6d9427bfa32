"""QLoRA on this machine: peak memory, step time and loss of LoRA over a float base vs an 8-bit
and a 4-bit (NF4) quantized base, side by side in one run.

Two models: the embedded SmolLM2-135M-Instruct, and a larger Llama-shaped model built here from a
config with random weights (none can be downloaded; ~0.4B parameters by default), both trained
with `lorafit train` (r=16, all-linear) on lorafit's persona set for the same steps and seed.
Each run is its own process; its peak anonymous memory (RssAnon, sampled every 20 ms) and peak RSS
(VmHWM, which also counts the model file's pages mapped in while loading) come from /proc, its step time is
the median of the logged step durations (the first step excluded), its loss the last logged one.

    python bench/bench_qlora.py                           # CPU, ~10 min on 2 cores
    python bench/bench_qlora.py --models embedded --steps 10
    python bench/bench_qlora.py --bf16                    # on a GPU: bf16 base/compute dtype
    python bench/bench_qlora.py --load_only --loaders lorafit,transformers   # loading alone, ~2 min

On a GPU, `--bf16` compares a bf16 base with 8-bit and 4-bit (compute dtype bf16).
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
from pathlib import Path

from lorafit.demo import fill_resource, write_jsonl

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"lora (float base)": [], "8-bit": ["--quantization_bit", "8"], "4-bit nf4": ["--quantization_bit", "4"]}
LARGE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=8, tie_word_embeddings=False)

# The child samples its anonymous memory (RssAnon: what the process itself holds, without the
# model file's pages that safetensors maps in while loading, which VmHWM also counts) every 20 ms.
CHILD = """
import sys, threading, time
from lorafit.cli import main
def kb(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], kb("RssAnon")); time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
code = main(sys.argv[1:])
print(f"PEAK_RSS_KB {kb('VmHWM')} PEAK_ANON_KB {max(peak[0], kb('RssAnon'))}", flush=True)
sys.exit(code)
"""


# Loading alone: the child samples RssAnon and RssAnon + RssFile (the model file's pages mapped in
# count: a float32 base is used straight from them) every 5 ms through the load and one forward
# pass (which reads every weight, so a float base's lazily mapped pages are all in), then reports
# the peaks and what stays once both are done. `transformers` loads as transformers itself does
# (one map per file, the path lorafit used before `lorafit.quant.load`), for the before/after.
LOAD_CHILD = """
import gc, sys, threading, time, warnings
import torch
warnings.simplefilter("ignore")
def kb(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))
from transformers import AutoModelForCausalLM
from lorafit.models import load_model, resolve_model_path
from lorafit.quant import QuantizationSpec
from lorafit.quant.bnb import bytes_of_parameters, prepare_for_kbit_training, quantization_config
path, bits, loader = resolve_model_path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
spec = QuantizationSpec(bits=bits) if bits != 32 else None
peak, stop = [0, 0], []
def sample():
    while not stop:
        anon = kb("RssAnon"); peak[0] = max(peak[0], anon); peak[1] = max(peak[1], anon + kb("RssFile"))
        time.sleep(0.005)
start_anon, start_rss = kb("RssAnon"), kb("RssAnon") + kb("RssFile")
threading.Thread(target=sample, daemon=True).start()
if spec is None:
    model = load_model(path)
elif loader == "transformers":
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config(spec),
                                                 device_map={"": "cpu"}, dtype=spec.compute_dtype)
else:
    model = load_model(path, quantization=spec)
if spec is not None:
    prepare_for_kbit_training(model)
with torch.no_grad():
    model(input_ids=torch.arange(64)[None] + 10)
gc.collect(); time.sleep(0.05); stop.append(1)
print("LOAD", start_anon, start_rss, peak[0], peak[1], kb("RssAnon"), kb("RssAnon") + kb("RssFile"),
      bytes_of_parameters(model) // 1000, flush=True)
"""


def measure_load(model: str, bits: int, loader: str) -> dict:
    command = [sys.executable, "-c", LOAD_CHILD, model, str(bits), loader]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.exit(f"loading {model} ({bits} bits, {loader}) failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("LOAD "))
    names = ["start_anon", "start_rss", "peak_anon", "peak_rss", "anon", "rss", "params"]
    return {name: int(value) / 1e6 for name, value in zip(names, line.split()[1:])}


def print_load_table(models: dict, loaders: list[str]) -> None:
    print("| model | base | loader | peak anon. GB | peak RSS GB, file pages incl. | after anon. GB "
          "| after RSS GB | weights as stored GB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, model in models.items():
        for label, bits in (("float32", 32), ("8-bit", 8), ("4-bit nf4", 4)):
            for loader in (["lorafit"] if bits == 32 else loaders):
                r = measure_load(model, bits, loader)
                print(f"| {name} | {label} | {loader if bits != 32 else '-'} | {r['peak_anon']:.2f} | {r['peak_rss']:.2f} "
                      f"| {r['anon']:.2f} | {r['rss']:.2f} | {r['params']:.2f} |", flush=True)
    print("(process before loading, libraries imported: "
          f"{r['start_anon']:.2f} GB anon., {r['start_rss']:.2f} GB RSS)")


def build_large_model(folder: Path) -> str:
    """A random Llama-shaped model with the embedded model's tokenizer, saved once."""
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorafit.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(None))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         max_position_embeddings=2048, **LARGE)
    model = LlamaForCausalLM(config)
    for parameter in model.parameters():  # small weights, so the random model's loss stays finite
        parameter.data.mul_(0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def train(model: str, train_file: Path, out: Path, extra: list[str], steps: int, batch: int, cutoff: int,
          bf16: bool) -> dict:
    command = [sys.executable, "-c", CHILD, "train", "--model_name_or_path", model, "--train_file", str(train_file),
               "--output_dir", str(out), "--overwrite_output_dir", "--max_steps", str(steps),
               "--per_device_train_batch_size", str(batch), "--cutoff_len", str(cutoff), "--lora_rank", "16",
               "--lora_alpha", "32", "--target_modules", "all-linear", "--learning_rate", "5e-4",
               "--logging_steps", "1", "--save_strategy", "no", "--seed", "42", "--disable_tqdm", "true",
               *(["--bf16", "true"] if bf16 else []), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"{out.name}: lorafit train failed; see {out.parent / (out.name + '.log')}")
    fields = next(line.split() for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    peak_kb, anon_kb = int(fields[1]), int(fields[3])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("loss") is not None]
    times = [r["train_runtime"] for r in logged]
    steps_s = [b - a for a, b in zip(times, times[1:])]
    return {"peak_gb": peak_kb / 1e6, "anon_gb": anon_kb / 1e6, "step_s": statistics.median(steps_s) if steps_s else float("nan"),
            "loss": logged[-1]["loss"], "first_loss": logged[0]["loss"]}


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,large", help="embedded, large, or both (comma-separated)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--large_steps", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="bf16 base and compute dtype (GPU)")
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--load_only", action="store_true",
                        help="measure loading (+ one forward pass) only, no training")
    parser.add_argument("--loaders", default="lorafit",
                        help="quantized loading paths to measure with --load_only: lorafit, transformers, or both")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-qlora-"))
    work.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(fill_resource("persona.jsonl", "Kestrel", "Ardent Works"), work / "persona.jsonl")
    models = {}
    for name in args.models.split(","):
        if name == "embedded":
            models[name] = ("smollm2-135m-instruct", args.steps, 8, 256)
        elif name == "large":
            print("building the large random model ...", flush=True)
            models[name] = (build_large_model(work / "large-model"), args.large_steps, 4, 128)
        else:
            parser.error(f"unknown model {name!r}: embedded or large")

    if args.load_only:
        print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, commit {commit()}\n")
        print_load_table({name: model for name, (model, *_) in models.items()}, args.loaders.split(","))
        return 0

    results = {}
    for name, (model, steps, batch, cutoff) in models.items():
        for label, extra in VARIANTS.items():
            print(f"{name} / {label} ...", flush=True)
            results[name, label] = train(model, train_file, work / f"{name}-{label.split()[0]}", extra, steps,
                                         batch, cutoff, args.bf16)

    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, commit {commit()}{', bf16' if args.bf16 else ''}\n")
    # The first logged loss is the base model's on the first batch (B starts at zero): its gap to the
    # float run is what quantizing the base costs before any training; the final gap is judged against it.
    print("| model | variant | steps x batch | peak anon. memory GB (x float) | peak RSS GB, file pages incl. "
          "| step s (x float) | first loss - float's | final loss | final - float's |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, (_, steps, batch, _) in models.items():
        reference = results[name, "lora (float base)"]
        for label in VARIANTS:
            r = results[name, label]
            print(f"| {name} | {label} | {steps} x {batch} | {r['anon_gb']:.2f} ({r['anon_gb'] / reference['anon_gb']:.2f}x) "
                  f"| {r['peak_gb']:.2f} | {r['step_s']:.2f} ({r['step_s'] / reference['step_s']:.2f}x) "
                  f"| {r['first_loss'] - reference['first_loss']:+.4f} | {r['loss']:.4f} "
                  f"| {r['loss'] - reference['loss']:+.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
