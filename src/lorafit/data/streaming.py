"""`--streaming`: data read and tokenized lazily, for JSON Lines files larger than memory.

Before training, one constant-memory pass reads every record, so bad records are still listed (or
written to rejected.jsonl) before the first step. Rendering happens lazily as the Trainer reads, so a
conversation the chat template refuses is found only when reached: under ``--on_bad_record error``
it stops training with its `path:line`; under ``skip`` it is logged and skipped. Evaluation records
are chosen by a hash of their source, so the split is the same on every pass without holding
anything in memory. Token counts are not known ahead (the summary says so).
"""

from __future__ import annotations

import hashlib
import logging

from lorafit.data.errors import BadRecordError, BadRecordsError
from lorafit.data.formats import Conversation, FormatOptions, read_records
from lorafit.data.placeholders import count_placeholders, warn_placeholders
from lorafit.data.render import IGNORE_INDEX, labels_for
from lorafit.data.summary import DataSummary
from lorafit.data.templates import end_of_turn_token_ids
from lorafit.data.truncate import Limits, fit_conversation

logger = logging.getLogger(__name__)
STREAM_SHUFFLE_BUFFER = 10_000


def in_validation_split(source: str, percentage: float) -> bool:
    """A stable choice of about `percentage` percent of records, from their `path:line` alone."""
    if not percentage:
        return False
    bucket = int.from_bytes(hashlib.sha256(source.encode()).digest()[:4], "big") % 10_000
    return bucket < percentage * 100


def check_files(files: list[str], options: FormatOptions, summary: DataSummary) -> list[dict]:
    """The constant-memory pass: count records and collect the rejected ones."""
    problems = []
    for path in files:
        for item in read_records(path, options):
            summary.records_read += 1
            if not isinstance(item, Conversation):
                problems.append({"source": item.source, "reason": item.reason, "record": item.raw})
            else:
                count_placeholders(item, summary)
    return problems


def stream_examples(files, options, tokenizer, limits, train_on, end_of_turn_ids, split, percentage,
                    on_bad_record, keep_source=False):
    """Generator of tokenized examples (`split` is "train" or "eval" of a percentage split, or "all")."""
    for path in files:
        for item in read_records(path, options):
            if not isinstance(item, Conversation):
                continue  # reported by check_files before training
            if split != "all" and in_validation_split(item.source, percentage) != (split == "eval"):
                continue
            try:
                rendered, _report = fit_conversation(tokenizer, item.messages, limits, item.tools, end_of_turn_ids)
            except BadRecordError as error:
                if on_bad_record == "error":
                    raise BadRecordsError([(item.source, error.reason)]) from None
                logger.warning("skipping %s: %s", item.source, error.reason)
                continue
            labels = labels_for(rendered, train_on)
            if all(label == IGNORE_INDEX for label in labels[1:]):
                continue
            example = {"input_ids": rendered.input_ids, "labels": labels}
            if keep_source:
                example["source"] = item.source
            yield example


def build_streaming_datasets(data_args, tokenizer, train_files, eval_files, output_dir, seed,
                             keep_source: bool = False):
    import datasets

    from lorafit.data.pipeline import PreparedData, write_rejected

    options = FormatOptions.from_args(data_args)
    summary = DataSummary(template=data_args.template_choice, train_on=data_args.train_on, streaming=True,
                          tokens=None, trained_tokens=None, longest=None, train_examples=None, eval_examples=None)
    problems = check_files(train_files + eval_files, options, summary)
    summary.rejected = len(problems)
    if problems and data_args.on_bad_record == "error":
        raise BadRecordsError([(p["source"], p["reason"]) for p in problems])
    summary.rejected_path = write_rejected(problems, output_dir)
    warn_placeholders(summary)

    common = {"options": options, "tokenizer": tokenizer, "limits": Limits.from_args(data_args),
              "train_on": data_args.train_on, "end_of_turn_ids": tuple(end_of_turn_token_ids(tokenizer)),  # a list would be sharded
              "percentage": data_args.validation_split_percentage, "on_bad_record": data_args.on_bad_record,
              "keep_source": keep_source}
    split_train = "all" if eval_files or not data_args.validation_split_percentage else "train"

    def dataset(files, split):
        return datasets.IterableDataset.from_generator(
            stream_examples, gen_kwargs={"files": files, "split": split, **common}
        )

    train = dataset(train_files, split_train).shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    if data_args.max_train_samples is not None:
        train = train.take(data_args.max_train_samples)
    evaluation = None
    if eval_files:
        evaluation = dataset(eval_files, "all")
    elif data_args.validation_split_percentage:
        evaluation = dataset(train_files, "eval")
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.take(data_args.max_eval_samples)
    return PreparedData(train, evaluation, summary)
