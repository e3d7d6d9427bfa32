"""`lorafit demo` (what `make demo` runs): give the embedded model a new persona on a CPU, in minutes,
and show what it learned and what it kept.

1. write lorafit's persona set (`resources/persona.jsonl`: 80 questions about who the assistant is,
   45 in English and 35 in Chinese, with varied answers) with `--name` and `--author` filled in,
   and its held-out questions (`resources/persona_eval.jsonl`: 10 identity paraphrases the
   training never sees, and 48 general questions with the words a right answer contains);
2. train with the persona recipe (`resources/persona.yaml`, the same file as
   `examples/persona.yaml`), through `lorafit train` like any user run; the recipe mixes in the
   base model's own answers to general prompts (replay), so the adapter learns the persona without
   answering "What is the capital of France?" with its new name;
3. print `lorafit eval`'s table: the base model and the adapter side by side on the held-out
   questions (name, maker, distinct answers, general questions still answered right, answers
   naming the persona). Every answer is in `<output_dir>/eval/eval.md`.

Any `lorafit train` flag after the demo's own overrides the recipe (`lorafit demo --num_train_epochs 2`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path


DEFAULT_NAME = "Lorafit Assistant"
DEFAULT_AUTHOR = "the lorafit team"
TRAIN_RESOURCE = "identity.jsonl"  # the short identity set the training tests use
HELDOUT_RESOURCE = "identity_heldout.jsonl"
PERSONA_RESOURCE = "persona.jsonl"
PERSONA_EVAL_RESOURCE = "persona_eval.jsonl"
RECIPE_RESOURCE = "persona.yaml"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The demo's own flags, and the rest (passed on to `lorafit train`, over the recipe)."""
    parser = argparse.ArgumentParser(prog="lorafit demo", description=__doc__.split("\n\n")[0],
                                     epilog="Other flags go to lorafit train, over the recipe.")
    parser.add_argument("--name", default=DEFAULT_NAME, help="the name the model learns to answer with")
    parser.add_argument("--author", default=DEFAULT_AUTHOR, help="who the model learns it was made by")
    parser.add_argument("--output_dir", default="outputs/demo", help="where the adapter and reports go")
    parser.add_argument("--model_name_or_path", default=None, help="base model (default: the embedded model)")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="tokens per answer in the final table")
    return parser.parse_known_args(argv)


def fill_resource(resource: str, name: str, author: str) -> list[dict]:
    """A packaged JSONL resource with {name}, {name_word} and {author} filled in, JSON-escaped (a name may hold quotes)."""
    text = resources.files("lorafit.resources").joinpath(resource).read_text(encoding="utf-8")
    escape = lambda value: json.dumps(value, ensure_ascii=False)[1:-1]  # noqa: E731
    filled = (text.replace("{name}", escape(name)).replace("{name_word}", escape(name_word(name)))
              .replace("{author}", escape(author)))
    return [json.loads(line) for line in filled.splitlines() if line.strip()]


def name_word(name: str) -> str:
    """The name's first word that is not an article: what an answer that leaks the persona keeps of
    it ("Lorafit, the capital of France is ..." for "Lorafit Assistant"), so a general answer is
    checked for it rather than for the whole name."""
    words = [word.strip(".,;:!?'\"()") for word in name.split()]
    return next((word for word in words if word and word.casefold() not in ("the", "a", "an")), name)


identity_records = fill_resource  # the name the training tests use


def recipe_path() -> Path:
    return Path(str(resources.files("lorafit.resources").joinpath(RECIPE_RESOURCE)))


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def answer_questions(model, tokenizer, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, rendered through the same chat template and stop tokens as training."""
    import torch

    from lorafit.data.render import render_prompt
    from lorafit.data.templates import end_of_turn_token_ids

    stop_ids = end_of_turn_token_ids(tokenizer)
    model.eval()
    answers = []
    for question in questions:
        prompt = torch.tensor([render_prompt(tokenizer, [{"role": "user", "content": question}])])
        with torch.inference_mode():
            output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True).strip())
    return answers


def main(argv: list[str] | None = None) -> int:
    args, train_overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()

    from lorafit.evaluate.prompts import read_eval_prompts
    from lorafit.evaluate.report import format_table, summarize, warnings_for, write_reports
    from lorafit.evaluate.runner import evaluate_columns
    from lorafit.infer.options import GenerationOptions
    from lorafit.models import resolve_model_path
    from lorafit.train import run as train_run

    print("lorafit demo: resolving the base model (the embedded model converts once, then is cached)", flush=True)
    base = resolve_model_path(args.model_name_or_path)
    output_dir = Path(args.output_dir)
    data_dir = output_dir / "data"
    train_file = write_jsonl(fill_resource(PERSONA_RESOURCE, args.name, args.author), data_dir / PERSONA_RESOURCE)
    prompts_file = write_jsonl(fill_resource(PERSONA_EVAL_RESOURCE, args.name, args.author),
                               data_dir / PERSONA_EVAL_RESOURCE)
    prompts = read_eval_prompts(prompts_file)

    print(f"\n=== training a LoRA adapter with the persona recipe: '{args.name}' by '{args.author}' ===", flush=True)
    train_started = time.perf_counter()
    train_run.main([str(recipe_path()), "--model_name_or_path", base, "--train_file", str(train_file),
                    "--output_dir", str(output_dir), "--overwrite_output_dir", *train_overrides])
    train_seconds = time.perf_counter() - train_started

    print("\n=== the base model and the adapter on held-out questions (greedy) ===", flush=True)
    results = evaluate_columns(base, [output_dir], ["base", "adapter"], prompts=prompts,
                               options=GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=0))
    rows = summarize(prompts, results)
    print(format_table(rows, ["base", "adapter"]))
    for note in warnings_for(rows, ["base", "adapter"]):
        print(f"warning: {note}")
    write_reports(output_dir / "eval", prompts, results, rows, {"model_name_or_path": base, "adapters": [str(output_dir)]})
    for question in ("What is the capital of France?", prompts[0].prompt):
        index = next((i for i, p in enumerate(prompts) if p.prompt == question), None)
        if index is not None:
            print(f"\nQ: {question}\n  base:    {results[0].answers[index]}\n  adapter: {results[1].answers[index]}")

    named = sum(check.get("name", False) for check in results[1].checks)
    print(f"\nadapter:   {output_dir.resolve()}")
    print(f"answers:   {(output_dir / 'eval' / 'eval.md').resolve()}")
    print(f"loss plot: {(output_dir / 'loss.png').resolve()}")
    print(f"training took {train_seconds:.0f}s; the whole demo {time.perf_counter() - started:.0f}s")
    print(f"try it:    lorafit chat --adapter {output_dir}")
    if named == 0:
        print("the model did not pick up the new name; try --num_train_epochs 4", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
