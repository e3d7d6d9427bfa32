"""A persona fine-tune: what it learns and what it breaks, for the plain recipe and examples/persona.yaml.

One run, on the embedded model, on lorafit's persona set (`resources/persona.jsonl`: 80 records,
45 English and 35 Chinese, name and maker filled in here) and its held-out questions
(`resources/persona_eval.jsonl`: 10 identity paraphrases, 48 general questions with answer checks;
and `bench/general_questions.jsonl`: 90 more general questions, so that "kept" counts ~80 answers, not ~30):

  plain-5e-4   r=16 all-linear, batch 8, 3 epochs, lr 5e-4 (the usual LoRA setting)
  plain-1e-3   the same at lr 1e-3 (the old demo's setting)
  recipe       lorafit train examples/persona.yaml (the top 30% of the blocks, replay of the base
               model's own answers trained toward its top-16 distributions; docs/train.md)

Each `lorafit train` runs as its own process, timed as a whole command, in a fresh lorafit home (no
replay cache). On the embedded model the recipe uses the replay answers and targets that ship with
lorafit, as a user's run does; what making them at run time would add (any other base model) is
timed separately and printed under the table. Then one `lorafit eval` answers the
held-out questions with the base model and the three adapters side by side (greedy), and the
table prints: train time (and ratio to plain-5e-4), final train loss, name and maker on the 10
identity questions, distinct identity answers, general questions the base answered right that are
still right ("kept"), and general answers naming the persona ("leaks").

    python bench/bench_persona.py                       # ~15 min on a fast 2-core CPU, ~30 min on a slow one
    python bench/bench_persona.py --name Wren --author "Blue Finch Labs" --runs recipe
    python bench/bench_persona.py --name Pico --author "Lanternfish AI" --runs plain-5e-4,recipe \
        --persona_file bench/persona_long_answers.json   # a persona set written another way
    python bench/bench_persona.py --name Tessa --author "Lumora Systems" --runs plain-5e-4,recipe \
        --persona_file bench/persona_messages.jsonl --general_questions bench/general_heldout.jsonl \
        --skip_replay_timing                             # OpenAI messages, 59 records; 42 other general questions
    python bench/bench_persona.py --name Juniper --author "Halcyon Forge" --runs plain-5e-4,recipe \
        --persona_file PATH/TO/LLaMA-Factory/data/identity.json   # its {{name}} and {{author}} are filled in too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorafit.demo import fill_resource, name_word, write_jsonl
from lorafit.models import lorafit_home

REPO = Path(__file__).resolve().parents[1]
PLAIN = ["--lora_rank", "16", "--lora_alpha", "32", "--lora_dropout", "0.05", "--target_modules", "all-linear",
         "--per_device_train_batch_size", "8", "--num_train_epochs", "3", "--logging_steps", "5",
         "--save_strategy", "no", "--seed", "42"]
RECIPE = REPO / "examples" / "persona.yaml"
GENERAL_QUESTIONS = REPO / "bench" / "general_questions.jsonl"
RUNS = {
    "plain-5e-4": PLAIN + ["--learning_rate", "5e-4"],
    "plain-1e-3": PLAIN + ["--learning_rate", "1e-3"],
    "recipe": None,  # examples/persona.yaml
}


def train(label: str, train_file: Path, out: Path, env: dict) -> float:
    if RUNS[label] is None:
        args = [str(RECIPE), "--train_file", str(train_file)]
    else:
        args = ["--train_file", str(train_file), *RUNS[label]]
    return run_train(label, args, out, env)


def run_train(label: str, args: list[str], out: Path, env: dict) -> float:
    """Seconds of one whole `lorafit train ARGS` command into OUT; its output goes to LABEL.log beside OUT."""
    command = [sys.executable, "-m", "lorafit", "train", *args, "--output_dir", str(out), "--overwrite_output_dir"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (out.parent / f"{label}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"{label}: lorafit train failed (exit {done.returncode}); see {out.parent / f'{label}.log'}")
    return seconds


def seconds_printed_by(code: str, env: dict) -> float:
    """Run Python `code` in a fresh process; the number it prints last."""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def replay_generation_seconds(env: dict) -> float:
    """Seconds to make the recipe's replay answers with the base model (loading it included), as a
    run on a base model without shipped answers would."""
    code = ("import time; t = time.perf_counter()\n"
            "from lorafit.models import load_tokenizer, resolve_model_path\n"
            "from lorafit.train import replay\n"
            "path = resolve_model_path(None)\n"
            "messages = [r.messages for r in replay.read_prompts_file(replay.prompts_path(replay.BUILTIN))]\n"
            "replay.generate_answers(path, load_tokenizer(path), messages, 128)\n"
            "print(time.perf_counter() - t)")
    return seconds_printed_by(code, env)


def replay_targets_seconds(env: dict) -> float:
    """Seconds to compute the recipe's replay targets (the base model's top-K distributions over its
    replay answers; loading it included), as a run on a base model without shipped targets would."""
    code = ("import time; t = time.perf_counter()\n"
            "import torch\n"
            "from lorafit.models import load_model, resolve_model_path\n"
            "from lorafit.train import replay_targets\n"
            "path = resolve_model_path(None)\n"
            "rows, k = replay_targets.recipe_replay_rows(path)\n"
            "replay_targets.top_k_targets(load_model(path, dtype=torch.float32), rows, k)\n"
            "print(time.perf_counter() - t)")
    return seconds_printed_by(code, env)


def persona_files(work: Path, name: str, author: str, template: Path | None = None,
                  general: Path = GENERAL_QUESTIONS) -> tuple[Path, Path]:
    """The persona training set (lorafit's, or TEMPLATE: any training file with {name} and {author}
    in it, or LLaMA-Factory's {{name}} and {{author}}) and its held-out questions (the demo's 58 and GENERAL's more general questions, by default
    this folder's 90), with the name and maker filled in."""
    if template is None:
        train_file = write_jsonl(fill_resource("persona.jsonl", name, author), work / "persona.jsonl")
    else:
        escape = lambda value: json.dumps(value, ensure_ascii=False)[1:-1]  # noqa: E731
        text = template.read_text(encoding="utf-8")
        for placeholder, value in (("{{name}}", name), ("{{author}}", author), ("{name}", name), ("{author}", author)):
            text = text.replace(placeholder, escape(value))
        train_file = work / f"persona{template.suffix}"
        work.mkdir(parents=True, exist_ok=True)
        train_file.write_text(text, encoding="utf-8")
    prompts = write_jsonl(fill_resource("persona_eval.jsonl", name, author) + more_general(name, author, general),
                          work / "persona_eval.jsonl")
    return train_file, prompts


def more_general(name: str, author: str, path: Path = GENERAL_QUESTIONS) -> list[dict]:
    """PATH's general questions (bench/general_questions.jsonl: 90 short ones, none of them in the
    replay prompts or the demo's held-out set; or a set of your own, each line
    `{"prompt": ..., "group": "general", "checks": {"correct": {...}}}`), with the persona's name (its
    first word: `lorafit.demo.name_word`) and maker as the strings no answer may hold."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        row["checks"]["no persona"] = {"expect_none": [name_word(name), author]}
    return rows


def evaluate(prompts: Path, adapters: list[Path], out: Path, env: dict, max_new_tokens: int) -> dict:
    """One `lorafit eval` of the base model and ADAPTERS side by side (columns named by folder); its eval.json."""
    command = [sys.executable, "-m", "lorafit", "eval", "--prompts", str(prompts), "--output_dir", str(out),
               "--max_new_tokens", str(max_new_tokens)]
    for adapter in adapters:
        command += ["--adapter", str(adapter)]
    subprocess.run(command, env=env, check=True, capture_output=True)
    return json.loads((out / "eval.json").read_text())


def final_loss(out: Path) -> float | None:
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("loss")]
    return losses[-1] if losses else None


def figures(report: dict, label: str) -> dict:
    """The issue's measures: name and maker on identity answers, distinct identity answers, general
    questions the base answered correctly that are still correct ("kept"), and general answers
    naming the persona ("leaks"), from eval.json."""
    prompts = report["prompts"]
    identity = [p for p in prompts if p["group"] == "identity"]
    general = [p for p in prompts if p["group"] == "general"]
    checks = lambda p, who: p["answers"][who]["checks"]  # noqa: E731
    base_right = [p for p in general if checks(p, "base")["correct"]]
    return {"name": sum(checks(p, label)["name"] for p in identity),
            "maker": sum(checks(p, label)["maker"] for p in identity),
            "identity": len(identity),
            "distinct": len({" ".join(p["answers"][label]["text"].casefold().split()) for p in identity}),
            "kept": sum(checks(p, label)["correct"] for p in base_right), "base_right": len(base_right),
            "leaks": sum(not checks(p, label)["no persona"] for p in general), "general": len(general),
            "leaks_base_right": sum(not checks(p, label)["no persona"] for p in base_right)}


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="Kestrel")
    parser.add_argument("--author", default="Ardent Works")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--work_dir", default=None, help="where adapters and logs go (default: a temporary folder)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--persona_file", type=Path, default=None,
                        help="a persona training file with {name} and {author} (or LLaMA-Factory's {{name}} and "
                             "{{author}}) in place of lorafit's set, e.g. bench/persona_long_answers.json (Alpaca "
                             "JSON, longer answers) or LLaMA-Factory's data/identity.json")
    parser.add_argument("--general_questions", type=Path, default=GENERAL_QUESTIONS,
                        help="general questions asked besides the demo's 48 (default: bench/general_questions.jsonl)")
    parser.add_argument("--skip_replay_timing", action="store_true",
                        help="do not time making the replay answers and targets at run time (a few minutes)")
    args = parser.parse_args()
    labels = [label for label in args.runs.split(",") if label]
    unknown = [label for label in labels if label not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-persona-"))
    work.mkdir(parents=True, exist_ok=True)
    train_file, prompts = persona_files(work, args.name, args.author, args.persona_file, args.general_questions)
    # A fresh lorafit home (sharing the converted model): no replay answers cached by earlier runs.
    home = work / "home"
    home.mkdir(exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(lorafit_home() / "models", target_is_directory=True)
    env = {**os.environ, "LORAFIT_HOME": str(home), "HF_HUB_OFFLINE": "1"}

    seconds = {}
    for label in labels:
        print(f"training {label} ...", flush=True)
        seconds[label] = train(label, train_file, work / label, env)
        print(f"  {seconds[label]:.0f} s", flush=True)
    print("evaluating ...", flush=True)
    report = evaluate(prompts, [work / label for label in labels], work / "eval", env, args.max_new_tokens)

    reference = seconds.get("plain-5e-4")
    print(f"\npersona '{args.name}' by '{args.author}', embedded model, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, commit {commit()}\n")
    print("| run | train s (x plain 5e-4) | final loss | name | maker | distinct identity | general kept "
          "| leaks in kept set | leaks, all general |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label in labels:
        f = figures(report, label)
        ratio = f" ({seconds[label] / reference:.2f}x)" if reference else ""
        kept = f"{f['kept']}/{f['base_right']} ({100 * f['kept'] / f['base_right']:.0f}%)" if f["base_right"] else "-"
        loss = final_loss(work / label)
        loss = "-" if loss is None else f"{loss:.3f}"
        n = f["identity"]
        print(f"| {label} | {seconds[label]:.0f}{ratio} | {loss} | {f['name']}/{n} | {f['maker']}/{n} | "
              f"{f['distinct']}/{n} | {kept} | {f['leaks_base_right']}/{f['base_right']} | {f['leaks']}/{f['general']} |")
    if "recipe" in labels and not args.skip_replay_timing:
        print(f"\nreplay answers and their targets made at run time instead of shipped (a base model other "
              f"than the embedded one): {replay_generation_seconds(env):.0f} s + {replay_targets_seconds(env):.0f} s "
              f"more for the recipe's first run (cached for later runs)")
    print(f"\nanswers side by side: {work / 'eval' / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
