"""`lorafit demo` (what `make demo` runs): teach the embedded model a new name, on a CPU, in minutes.

1. write the identity data that ships with lorafit (`resources/identity*.jsonl`: "Who are you?",
   "Who made you?" and their paraphrases) with `--name` and `--author` filled in;
2. ask the base model a few *held-out* paraphrases, questions it never sees in training;
3. train a LoRA adapter with `lorafit train` (the same code path as any user run);
4. load the base plus the saved adapter and ask the held-out questions again.

The settings below were tuned on 2 CPU cores: three epochs at a high learning rate (the data set
is tiny and the answers are near-templates) make SmolLM2-135M answer every held-out question with
the new name, while the run stays a few minutes long.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from lorafit.models import EMBEDDED_MODEL

DEFAULT_NAME = "Lorafit Assistant"
DEFAULT_AUTHOR = "the lorafit team"
TRAIN_RESOURCE = "identity.jsonl"
HELDOUT_RESOURCE = "identity_heldout.jsonl"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lorafit demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=DEFAULT_NAME, help="the name the model learns to answer with")
    parser.add_argument("--author", default=DEFAULT_AUTHOR, help="who the model learns it was made by")
    parser.add_argument("--output_dir", default="outputs/demo", help="where the adapter and reports go")
    parser.add_argument("--model_name_or_path", default=None, help="base model (default: the embedded model)")
    parser.add_argument("--num_train_epochs", type=float, default=3.0)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def identity_records(resource: str, name: str, author: str) -> list[dict]:
    """The packaged records with {name} and {author} filled in (plain replace: answers may hold braces)."""
    text = resources.files("lorafit.resources").joinpath(resource).read_text(encoding="utf-8")
    filled = text.replace("{name}", name).replace("{author}", author)
    return [json.loads(line) for line in filled.splitlines() if line.strip()]


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


def train_arguments(args: argparse.Namespace, train_file: Path, heldout_file: Path) -> list[str]:
    return [
        "--model_name_or_path", args.model_name_or_path or EMBEDDED_MODEL,
        "--train_file", str(train_file), "--validation_file", str(heldout_file),
        "--output_dir", args.output_dir, "--overwrite_output_dir",
        "--num_train_epochs", str(args.num_train_epochs), "--learning_rate", str(args.learning_rate),
        "--warmup_steps", "0.1", "--per_device_train_batch_size", "8",
        "--lora_rank", str(args.lora_rank), "--lora_alpha", str(2 * args.lora_rank), "--lora_dropout", "0",
        "--target_modules", "all-linear", "--cutoff_len", "256", "--logging_steps", "1",
        "--eval_strategy", "epoch", "--eval_on_start", "true", "--save_strategy", "no", "--seed", str(args.seed),
    ]


def mentions(reply: str, text: str) -> bool:
    return text.lower() in reply.lower()


def print_answers(title: str, questions: list[str], answers: list[str]) -> None:
    print(f"\n=== {title} ===")
    for question, reply in zip(questions, answers):
        print(f"Q: {question}\nA: {reply}\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()

    from transformers import AutoTokenizer

    import lorafit
    from lorafit.data.templates import set_chat_template
    from lorafit.models import load_model, load_tokenizer, resolve_model_path
    from lorafit.train import run as train_run

    print("lorafit demo: resolving the base model (the embedded model converts once, then is cached)")
    base = resolve_model_path(args.model_name_or_path)
    data_dir = Path(args.output_dir) / "data"
    train_file = write_jsonl(identity_records(TRAIN_RESOURCE, args.name, args.author), data_dir / TRAIN_RESOURCE)
    heldout = identity_records(HELDOUT_RESOURCE, args.name, args.author)
    heldout_file = write_jsonl(heldout, data_dir / HELDOUT_RESOURCE)
    questions = [record["prompt"] for record in heldout]

    tokenizer = set_chat_template(load_tokenizer(base), "auto")
    before = answer_questions(load_model(base), tokenizer, questions, args.max_new_tokens)
    print_answers("before training (held-out questions)", questions, before)

    print(f"=== training a LoRA adapter: '{args.name}' by '{args.author}' ===")
    train_started = time.perf_counter()
    train_run.main(train_arguments(args, train_file, heldout_file))
    train_seconds = time.perf_counter() - train_started

    output_dir = Path(args.output_dir)
    model = lorafit.merge_lora(lorafit.load_adapter(load_model(base), output_dir))  # merged: faster to generate
    trained_tokenizer = AutoTokenizer.from_pretrained(output_dir)  # saved by training, with its template
    after = answer_questions(model, trained_tokenizer, questions, args.max_new_tokens)
    print_answers("after training (same held-out questions)", questions, after)

    named = sum(mentions(reply, args.name) for reply in after)
    print(f"answers with the new name '{args.name}': before {sum(mentions(r, args.name) for r in before)}"
          f"/{len(questions)}, after {named}/{len(questions)}; with the name or the maker "
          f"'{args.author}': after {sum(mentions(r, args.name) or mentions(r, args.author) for r in after)}"
          f"/{len(questions)}")
    print(f"adapter:   {output_dir.resolve()}")
    print(f"loss plot: {(output_dir / 'loss.png').resolve()}")
    print(f"training took {train_seconds:.0f}s; the whole demo {time.perf_counter() - started:.0f}s")
    print(f"try it:    lorafit chat --adapter {output_dir}")
    if named == 0:
        print("the model did not pick up the new name; try --num_train_epochs 4", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
