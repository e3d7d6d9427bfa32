"""`lorafit eval`: what a fine-tune learned and what it broke, base model and adapters side by side.

    lorafit eval --adapter out --prompts checks.jsonl                 # answers + checks, base vs adapter
    lorafit eval --adapter a --adapter b --eval_file heldout.jsonl    # held-out loss and perplexity
    lorafit eval --adapter out --tasks my_task --include_path tasks/  # lm-evaluation-harness tasks
    lorafit eval --adapter out --prompts checks.jsonl --adapter_scales 0.6,0.8,1   # one adapter, scaled

The base model is always the first column; it loads once and each adapter is switched on and off
in turn (`lorafit.evaluate.runner`). Answers are greedy unless `--temperature` says otherwise.
Results print as a table and are written to `--output_dir` as eval.json (every answer, check and
figure) and eval.md (the table and the answers side by side, shortened).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from lorafit.errors import UserError
from lorafit.infer.options import GenerationOptions, add_generation_arguments, options_from_args

logger = logging.getLogger(__name__)

EVAL_DEFAULTS = GenerationOptions(max_new_tokens=128, temperature=0.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    model = parser.add_argument_group("models")
    model.add_argument("--model_name_or_path", default=None,
                       help="base model: a folder or a Hub id (default: the first adapter's base, else the embedded "
                            "smollm2-135m-instruct)")
    model.add_argument("--adapter", action="append", default=[], metavar="DIR",
                       help="an adapter folder to compare with the base (repeatable)")
    model.add_argument("--adapter_scales", default=None, metavar="T[,T...]",
                       help="evaluate each adapter with its update times each T (columns ADAPTER@T): 1 is the "
                            "adapter as trained, 0.7 is 70%% of the way from the base (as lorafit train "
                            "--adapter_scale would save it), so one trained adapter shows where to scale it")
    model.add_argument("--template", default="auto",
                       help="chat template for columns whose folder carries no tokenizer (as in lorafit chat)")
    model.add_argument("--dtype", default="auto", help="weights dtype: auto, float32, bfloat16, float16")
    model.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    model.add_argument("--trust_remote_code", action="store_true", help="allow model code from the Hub (off by default)")
    what = parser.add_argument_group("what to measure (at least one)")
    what.add_argument("--prompts", metavar="FILE.jsonl",
                      help="prompts with checks (expect_any, expect_all, expect_none, regex; see docs/eval.md)")
    what.add_argument("--eval_file", action="append", default=[], metavar="FILE",
                      help="held-out conversations (any training format): loss and perplexity on assistant turns")
    what.add_argument("--tasks", default=None,
                      help="comma-separated lm-evaluation-harness tasks (needs pip install 'lorafit[eval]')")
    what.add_argument("--include_path", default=None, metavar="DIR", help="a folder of extra lm-eval task YAML files")
    what.add_argument("--limit", type=float, default=None,
                      help="lm-eval: at most this many examples per task (a fraction below 1)")
    what.add_argument("--num_fewshot", type=int, default=None, help="lm-eval: few-shot examples per question")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", default="eval_results", help="where eval.json and eval.md go (default: eval_results)")
    out.add_argument("--batch_size", type=int, default=8, help="prompts answered at once (default: 8)")
    out.add_argument("--max_length", type=int, default=None,
                     help="held-out loss: cut conversations to this many tokens (default: the model's context)")
    add_generation_arguments(parser, EVAL_DEFAULTS)
    return parser


def check_args(args) -> None:
    if not (args.prompts or args.eval_file or args.tasks):
        raise UserError("lorafit eval needs something to measure: --prompts, --eval_file or --tasks")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be a positive integer, got {args.batch_size}")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit must be positive, got {args.limit}")
    if (args.limit is not None or args.num_fewshot is not None or args.include_path) and not args.tasks:
        raise UserError("--limit, --num_fewshot and --include_path apply to --tasks; pass --tasks too")
    if args.include_path and not Path(args.include_path).is_dir():
        raise UserError(f"--include_path {args.include_path}: no such folder")
    if args.adapter_scales is not None and not args.adapter:
        raise UserError("--adapter_scales scales adapters; pass at least one --adapter")


def parse_scales(text: str | None) -> list[float]:
    """'0.7,1' -> [0.7, 1.0]; each a positive number."""
    if text is None:
        return [1.0]
    scales = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise UserError(f"--adapter_scales {text}: each scale must be a positive number "
                            f"(1 = the adapter as trained), got {part.strip()!r}")
        scales.append(value)
    if len(set(scales)) != len(scales):
        raise UserError(f"--adapter_scales {text}: a scale is given twice")
    return scales


def scaled_columns(adapters: list[Path], scales: list[float], labels: list[str]):
    """Every adapter at every scale: (adapters, scales, labels) of the columns after the base.
    Without --adapter_scales (scales == [1.0]) the columns are the adapters as they are."""
    if scales == [1.0]:
        return adapters, [1.0] * len(adapters), labels
    from lorafit.lora.adapter_io import read_adapter_config

    for adapter in adapters:
        if read_adapter_config(adapter).get("use_dora"):
            raise UserError(f"--adapter_scales: {adapter} is a DoRA adapter; its magnitude renormalises the "
                            "weight, so scaling its update does not move it toward the base")
    columns = [(adapter, scale, f"{label}@{scale:g}") for adapter, label in zip(adapters, labels[1:])
               for scale in scales]
    return [c[0] for c in columns], [c[1] for c in columns], [labels[0], *(c[2] for c in columns)]


def read_eval_conversations(files: list[str]) -> list[list[dict]]:
    from lorafit.data.errors import BadRecordsError
    from lorafit.data.formats import Conversation, FormatOptions, read_records, resolve_files

    conversations, problems = [], []
    for path in resolve_files(files, "--eval_file"):
        for item in read_records(path, FormatOptions()):
            if isinstance(item, Conversation):
                conversations.append(item.messages)
            else:
                problems.append((item.source, item.reason))
    if problems:
        raise BadRecordsError(problems)
    return conversations


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    scales = parse_scales(args.adapter_scales)
    options = options_from_args(args)
    task_request = None
    if args.tasks:
        from lorafit.evaluate.harness import TaskRequest

        task_request = TaskRequest.from_args(args)  # checks that lm-eval is installed and the tasks exist
    from lorafit.evaluate.prompts import read_eval_prompts
    from lorafit.evaluate.report import format_table, summarize, warnings_for, write_reports
    from lorafit.evaluate.runner import column_labels, evaluate_columns
    from lorafit.infer.loading import check_adapter_folder, choose_base_model

    prompts = read_eval_prompts(args.prompts) if args.prompts else []
    conversations = read_eval_conversations(args.eval_file) if args.eval_file else None
    adapters = [check_adapter_folder(a) for a in args.adapter]
    base = choose_base_model(args.model_name_or_path, adapters[0] if adapters else None)
    columns, column_scales, labels = scaled_columns(adapters, scales, column_labels(adapters))
    started = time.perf_counter()
    results = evaluate_columns(base, columns, labels, scales=column_scales, prompts=prompts, options=options,
                               conversations=conversations, tasks=task_request, template=args.template, dtype=args.dtype,
                               device=args.device, trust_remote_code=args.trust_remote_code,
                               batch_size=args.batch_size, max_length=args.max_length)
    rows = summarize(prompts, results)
    labels = [r.label for r in results]
    print(format_table(rows, labels))
    for note in warnings_for(rows, labels):
        print(f"warning: {note}")
    settings = {"model_name_or_path": base, "adapters": [str(a) for a in adapters],
                "adapter_scales": scales, "prompts": args.prompts,
                "eval_file": args.eval_file, "tasks": args.tasks, "limit": args.limit,
                "generation": {"max_new_tokens": options.max_new_tokens, "temperature": options.temperature},
                "seconds": round(time.perf_counter() - started, 1)}
    json_path, md_path = write_reports(Path(args.output_dir), prompts, results, rows, settings)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0
