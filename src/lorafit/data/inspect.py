"""`lorafit data inspect`: look at exactly what training will see.

Takes the same data, model and template arguments as `lorafit train`. With ``--output FILE`` it
writes one JSON line per example, ``{"source", "input_ids", "labels", "text"}``; without it, it prints
each example's rendered text with the trained tokens highlighted (green on a colour terminal,
``«between guillemets»`` otherwise). Either way it ends with the data summary and the padding
efficiency of the chosen batching.

    lorafit data inspect --train_file data.jsonl --limit 3
    lorafit data inspect --train_file data.jsonl --template alpaca --output examples.jsonl
"""

from __future__ import annotations

import difflib
import json
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Literal

from lorafit.data.args import DataArguments
from lorafit.data.render import IGNORE_INDEX
from lorafit.data.summary import padding_efficiency
from lorafit.errors import UserError

USAGE = "usage: lorafit data inspect --train_file FILE [data arguments] [--output FILE] [--limit N]"


@dataclass
class InspectArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "model whose tokenizer renders the data (default: the embedded model)"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the tokenizer's own Python code"})
    output: str | None = field(default=None, metadata={"help": "write one JSON line per example to this file"})
    limit: int | None = field(default=None, metadata={"help": "show or write at most N examples (terminal: 5)"})
    split: Literal["train", "eval"] = field(default="train", metadata={"help": "which split to look at"})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "batch size used to compute the padding efficiency"}
    )
    output_dir: str | None = field(default=None, metadata={"help": "where --on_bad_record skip writes rejected.jsonl"})
    seed: int = field(default=42, metadata={"help": "seed of the validation split and of the batch order"})


def parse(argv: list[str]) -> tuple[DataArguments, InspectArguments]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((DataArguments, InspectArguments), prog="lorafit data inspect")
    data_args, inspect_args, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown:
        known = [option for action in parser._actions for option in action.option_strings]
        flag = unknown[0].split("=")[0]
        close = difflib.get_close_matches(flag, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown argument {unknown[0]}{hint}; see lorafit data inspect --help")
    return data_args, inspect_args


def trained_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The rendered text as (text, trained) runs; decoded run by run so marks fall between tokens.
    `highlight` prints them, the web page (`lorafit ui`) colours them."""
    runs, run, trained = [], [], None
    for token, label in zip(input_ids + [None], labels + [None]):
        is_trained = label is not None and label != IGNORE_INDEX
        if token is None or (run and is_trained != trained):
            runs.append((tokenizer.decode(run), bool(trained)))
            run = []
        if token is not None:
            run.append(token)
            trained = is_trained
    return runs


def highlight(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The rendered text with trained tokens marked (green on a terminal, «guillemets» otherwise)."""
    start, end = ("\033[1;32m", "\033[0m") if color else ("«", "»")
    return "".join(f"{start}{text}{end}" if trained else text
                   for text, trained in trained_runs(tokenizer, input_ids, labels))


def example_record(tokenizer, row: dict) -> dict:
    return {"source": row["source"], "input_ids": list(row["input_ids"]), "labels": list(row["labels"]),
            "text": tokenizer.decode(row["input_ids"])}


def efficiency_line(lengths: list[int], data_args: DataArguments, args: InspectArguments) -> str:
    order = list(lengths)
    random.Random(args.seed).shuffle(order)  # the Trainer's sampler shuffles too
    size = args.per_device_train_batch_size
    efficiency = padding_efficiency(order, size, data_args.packing, data_args.pad_to_multiple_of)
    if data_args.packing:
        return f"  padding efficiency  {100 * efficiency:.1f}% (packing, {size} examples per row)"
    packed = padding_efficiency(order, size, True, data_args.pad_to_multiple_of)
    # transformers' LengthGroupedSampler sorts within shuffled "megabatches" of 50 batches
    megabatch = 50 * size
    grouped_order = [length for start in range(0, len(order), megabatch)
                     for length in sorted(order[start:start + megabatch], reverse=True)]
    grouped = padding_efficiency(grouped_order, size, False, data_args.pad_to_multiple_of)
    return (f"  padding efficiency  {100 * efficiency:.1f}% (dynamic padding, batch size {size}); "
            f"~{100 * grouped:.0f}% with --group_by_length, {100 * packed:.0f}% with --packing")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nRun `lorafit data inspect --help` for every argument.")
        return 0 if argv else 2
    if argv[0] != "inspect":
        raise UserError(f"unknown data command '{argv[0]}': the only one is 'inspect'\n{USAGE}")
    data_args, args = parse(argv[1:])

    from lorafit.data.pipeline import build_datasets
    from lorafit.models import load_tokenizer

    tokenizer = load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    prepared = build_datasets(data_args, tokenizer, output_dir=args.output_dir, seed=args.seed, keep_source=True)
    dataset = prepared.train if args.split == "train" else prepared.eval
    if dataset is None:
        raise UserError("there is no evaluation split: pass --validation_file or --validation_split_percentage")
    limit = args.limit if args.limit is not None else (None if args.output else 5)
    rows = list(dataset if limit is None else _take(dataset, limit))

    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(example_record(tokenizer, row), ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} examples to {args.output}")
    else:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        for row in rows:
            trained = sum(label != IGNORE_INDEX for label in row["labels"])
            print(f"── {row['source']}  ({len(row['input_ids'])} tokens, {trained} trained)")
            print(highlight(tokenizer, list(row["input_ids"]), list(row["labels"]), color))
    print(prepared.summary.format())
    lengths = [len(row["input_ids"]) for row in rows] if data_args.streaming else _lengths(dataset)
    print(efficiency_line(lengths, data_args, args))
    return 0


def _take(dataset, limit: int):
    if hasattr(dataset, "select"):
        return dataset.select(range(min(limit, len(dataset))))
    return dataset.take(limit)


def _lengths(dataset) -> list[int]:
    return [len(ids) for ids in dataset["input_ids"]]
