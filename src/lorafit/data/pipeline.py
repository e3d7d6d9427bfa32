"""`build_datasets`: data files -> tokenized train/eval datasets of {"input_ids", "labels"} rows.

Steps: read every file into conversations (bad records collected with their `path:line`), split off
evaluation records, render and truncate through `datasets.map` (``--preprocessing_num_workers``),
drop examples with no trainable token, then either stop with a list of the bad records
(``--on_bad_record error``) or write them to ``<output_dir>/rejected.jsonl`` and go on (``skip``).

Tokenized results are cached on disk under a key made of the files (path, size, mtime), the
tokenizer (vocabulary, special tokens, chat template) and every argument that changes the result;
``--overwrite_cache`` rebuilds. ``--streaming`` instead checks the files in one constant-memory pass
and tokenizes lazily as training reads them (an `IterableDataset`; the Trainer then needs
``--max_steps``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from lorafit.data.errors import BadRecordError, BadRecordsError, DataConfigError
from lorafit.data.formats import Conversation, FormatOptions, Rejection, read_records, resolve_files
from lorafit.data.placeholders import count_placeholders, warn_placeholders
from lorafit.data.render import IGNORE_INDEX, labels_for
from lorafit.data.summary import DataSummary
from lorafit.data.templates import end_of_turn_token_ids, set_chat_template
from lorafit.data.truncate import Limits, fit_conversation

logger = logging.getLogger(__name__)

# Bump when rendering, truncation or the cached summary's fields change, so old caches are rebuilt
# rather than trusted.
CACHE_VERSION = 2
TOKENIZED_COLUMNS = ["input_ids", "labels"]


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset, or datasets.IterableDataset with --streaming
    eval: Any | None
    summary: DataSummary


def build_datasets(data_args, tokenizer, output_dir: str | None = None, seed: int = 42,
                   keep_source: bool = False) -> PreparedData:
    """Read, render, truncate and tokenize the data of `data_args` (see the module docstring).

    Installs the chosen chat template on `tokenizer`, so saving the tokenizer afterwards saves it.
    `keep_source=True` keeps a "source" column (``path:line``) beside input_ids and labels.
    """
    if not data_args.train_file:
        raise DataConfigError("--train_file is required: a JSON/JSONL file, a folder or a glob")
    if not data_args.ignore_pad_token_for_loss:
        logger.warning("--ignore_pad_token_for_loss false has no effect: padding is never part of the loss")
    set_chat_template(tokenizer, data_args.template_choice)
    train_files = resolve_files(data_args.train_file, "--train_file")
    eval_files = resolve_files(data_args.validation_file, "--validation_file")
    if data_args.streaming:
        from lorafit.data.streaming import build_streaming_datasets

        return build_streaming_datasets(data_args, tokenizer, train_files, eval_files, output_dir, seed, keep_source)

    cache_path = os.path.join(data_args.cache_root(), cache_key(data_args, tokenizer, train_files, eval_files, seed))
    cached = None if data_args.overwrite_cache else _load_cache(cache_path)
    if cached is None:
        train, evaluation, summary, problems = _prepare(data_args, tokenizer, train_files, eval_files, seed)
        if not (problems and data_args.on_bad_record == "error"):
            _save_cache(cache_path, train, evaluation, summary, problems)
            train, evaluation, summary, problems = _load_cache(cache_path) or (train, evaluation, summary, problems)
    else:
        train, evaluation, summary, problems = cached
        logger.info("using tokenized data cached in %s", cache_path)
    if problems and data_args.on_bad_record == "error":
        raise BadRecordsError([(p["source"], p["reason"]) for p in problems])
    warn_placeholders(summary)  # on every run, the cached ones too
    summary.cache_path = cache_path
    if problems:
        summary.rejected_path = write_rejected(problems, output_dir)
    train, evaluation = _limit_and_select(train, evaluation, data_args, keep_source)
    summary.train_examples = len(train)
    summary.eval_examples = len(evaluation) if evaluation is not None else 0
    return PreparedData(train, evaluation, summary)


# ---- reading and tokenizing ----------------------------------------------------------------------

def read_conversations(files: list[str], options: FormatOptions, start: int = 0):
    """(conversations, rejections) of `files`, each item numbered in reading order from `start`."""
    conversations, rejections = [], []
    ordinal = start
    for path in files:
        for item in read_records(path, options):
            target = conversations if isinstance(item, Conversation) else rejections
            target.append((ordinal, item))
            ordinal += 1
    return conversations, rejections


def read_training_conversations(files: list[str], options: FormatOptions, data_args, seed: int):
    """`read_conversations` of the training files, each limited to `--max_samples` and mixed by
    `--mix_strategy` (`lorafit.data.mix`); mixed items are renumbered in their new order."""
    if data_args.max_samples is None and (data_args.mix_strategy == "concat" or len(files) < 2):
        return read_conversations(files, options)
    from lorafit.data.mix import mix, parse_probs

    per_file, rejections, ordinal = [], [], 0
    for path in files:
        conversations, rejected = read_conversations([path], options, start=ordinal)
        ordinal += len(conversations) + len(rejected)
        per_file.append([conversation for _, conversation in conversations])
        rejections += rejected
    mixed = mix(per_file, data_args.mix_strategy, parse_probs(data_args.interleave_probs, len(files)),
                data_args.max_samples, seed)
    return [(ordinal + index, conversation) for index, conversation in enumerate(mixed)], rejections


def split_validation(conversations: list, percentage: float, seed: int):
    """Hold out `percentage` percent of the conversations (at least one), chosen with `seed`."""
    if not percentage or len(conversations) < 2:
        return conversations, []
    held_out = max(1, round(len(conversations) * percentage / 100))
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held_out])
    train = [c for i, c in enumerate(conversations) if i not in chosen]
    return train, [c for i, c in enumerate(conversations) if i in chosen]


def tokenize_batch(batch: dict, tokenizer, limits: Limits, train_on: str, end_of_turn_ids: list[int]) -> dict:
    """`datasets.map` function: conversation JSON -> input_ids, labels and what truncation did."""
    out = {key: [] for key in ("input_ids", "labels", "error", "truncated", "turns_dropped",
                               "responses_cut", "trained")}
    for conversation, tools in zip(batch["conversation"], batch["tools"]):
        try:
            rendered, report = fit_conversation(tokenizer, json.loads(conversation), limits,
                                                json.loads(tools) if tools else None, end_of_turn_ids)
            labels = labels_for(rendered, train_on)
            values = (rendered.input_ids, labels, "", report.truncated, report.history_turns_dropped,
                      report.responses_cut, sum(label != IGNORE_INDEX for label in labels[1:]))
        except BadRecordError as error:
            values = ([], [], error.reason, False, 0, 0, 0)
        for key, value in zip(out, values):
            out[key].append(value)
    return out


def _tokenize(conversations: list, data_args, tokenizer, fingerprint: str):
    import datasets

    rows = {
        "ordinal": [ordinal for ordinal, _ in conversations],
        "source": [c.source for _, c in conversations],
        "conversation": [json.dumps(c.messages, ensure_ascii=False) for _, c in conversations],
        "tools": [json.dumps(c.tools, ensure_ascii=False) if c.tools else "" for _, c in conversations],
    }
    table = datasets.Dataset.from_dict(rows)
    workers = data_args.preprocessing_num_workers
    return table.map(
        tokenize_batch, batched=True, batch_size=64, remove_columns=["conversation"],
        num_proc=workers if workers and workers > 1 and len(table) > workers else None,
        fn_kwargs={"tokenizer": tokenizer, "limits": Limits.from_args(data_args),
                   "train_on": data_args.train_on, "end_of_turn_ids": end_of_turn_token_ids(tokenizer)},
        new_fingerprint=fingerprint, desc="tokenizing",
    )


def _finish_split(processed, summary: DataSummary, problems: list, count_stats: bool):
    """Record render failures as problems, drop bad and untrainable rows, add counts to the summary."""
    if len(processed) == 0:
        return _empty_split()
    columns = processed.select_columns(["ordinal", "source", "tools", "error", "truncated", "turns_dropped",
                                        "responses_cut", "trained"]).to_dict()
    keep = []
    for i, error in enumerate(columns["error"]):
        if error:
            problems.append({"ordinal": columns["ordinal"][i], "source": columns["source"][i], "reason": error})
        elif columns["trained"][i] == 0:
            summary.dropped += 1
        else:
            keep.append(i)
    if count_stats:
        summary.truncated += sum(columns["truncated"][i] for i in keep)
        summary.history_turns_dropped += sum(columns["turns_dropped"][i] for i in keep)
        summary.responses_cut += sum(columns["responses_cut"][i] for i in keep)
        summary.trained_tokens += sum(columns["trained"][i] for i in keep)
    kept = processed.select(keep).select_columns(["source", *TOKENIZED_COLUMNS])
    if count_stats:
        lengths = [len(ids) for ids in kept["input_ids"]]
        summary.tokens += sum(lengths)
        summary.longest = max(lengths, default=0)
    return kept


def _empty_split():
    import datasets

    tokens = datasets.List(datasets.Value("int64"))
    features = datasets.Features({"source": datasets.Value("string"), "input_ids": tokens, "labels": tokens})
    return datasets.Dataset.from_dict({"source": [], "input_ids": [], "labels": []}, features=features)


def _prepare(data_args, tokenizer, train_files, eval_files, seed):
    options = FormatOptions.from_args(data_args)
    summary = DataSummary(template=data_args.template_choice, train_on=data_args.train_on)
    train_items, rejections = read_training_conversations(train_files, options, data_args, seed)
    eval_items, eval_rejections = read_conversations(eval_files, options, start=len(train_items) + len(rejections))
    if not eval_files:
        train_items, eval_items = split_validation(train_items, data_args.validation_split_percentage, seed)
    rejections += eval_rejections
    summary.records_read = len(train_items) + len(eval_items) + len(rejections)
    for _, conversation in train_items + eval_items:
        count_placeholders(conversation, summary)
    problems = [{"ordinal": o, "source": r.source, "reason": r.reason, "record": r.raw} for o, r in rejections]
    key = cache_key(data_args, tokenizer, train_files, eval_files, seed)
    train = _finish_split(_tokenize(train_items, data_args, tokenizer, key + "-train"), summary, problems, True)
    evaluation = None
    if eval_items:
        evaluation = _finish_split(_tokenize(eval_items, data_args, tokenizer, key + "-eval"), summary, problems, False)
    problems.sort(key=lambda problem: problem["ordinal"])
    if len(train) == 0 and not (problems and data_args.on_bad_record == "error"):
        reasons = "".join(f"\n  {p['source']}: {p['reason']}" for p in problems[:5])
        raise DataConfigError(
            f"no usable training example in {', '.join(train_files)} "
            f"({len(problems)} rejected, {summary.dropped} with no trainable token){reasons}"
        )
    summary.rejected = len(problems)
    _attach_records(problems, train_items + eval_items)
    return train, evaluation, summary, problems


def _attach_records(problems: list, conversations: list) -> None:
    """Give render failures their conversation, so rejected.jsonl shows what was refused."""
    by_ordinal = {ordinal: conversation for ordinal, conversation in conversations}
    for problem in problems:
        if "record" not in problem and problem["ordinal"] in by_ordinal:
            conversation = by_ordinal[problem["ordinal"]]
            problem["messages"] = conversation.messages
            if conversation.tools:
                problem["tools"] = conversation.tools


def _limit_and_select(train, evaluation, data_args, keep_source: bool):
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    if not keep_source:
        train = train.remove_columns("source")
        evaluation = evaluation.remove_columns("source") if evaluation is not None else None
    return train, evaluation


def write_rejected(problems: list, output_dir: str | None) -> str | None:
    """Write `problems` as JSON lines to <output_dir>/rejected.jsonl (with a warning); return the path."""
    if not problems:
        return None
    if not output_dir:
        logger.warning("%d bad record(s) skipped", len(problems))
        return None
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "rejected.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        for problem in problems:
            row = {key: value for key, value in problem.items() if key != "ordinal"}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    logger.warning("%d bad record(s) skipped: reasons in %s", len(problems), path)
    return path


# ---- cache ---------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else
                  json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.chat_template, sort_keys=True, default=str).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(str(type(tokenizer).__name__).encode())
    return digest.hexdigest()


CACHE_ARGS = ("data_format", "prompt_column", "response_column", "history_column", "system_column",
              "train_on", "cutoff_len", "max_source_length", "max_target_length", "validation_split_percentage",
              "max_samples", "mix_strategy", "interleave_probs")


def cache_key(data_args, tokenizer, train_files, eval_files, seed) -> str:
    def stamp(path):
        status = os.stat(path)
        return [os.path.abspath(path), status.st_size, status.st_mtime_ns]

    parts = {
        "version": CACHE_VERSION, "seed": seed,
        "train": [stamp(f) for f in train_files], "eval": [stamp(f) for f in eval_files],
        "args": {name: getattr(data_args, name) for name in CACHE_ARGS},
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _save_cache(path: str, train, evaluation, summary: DataSummary, problems: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(path))
    try:
        train.save_to_disk(os.path.join(staging, "train"))
        if evaluation is not None:
            evaluation.save_to_disk(os.path.join(staging, "eval"))
        with open(os.path.join(staging, "summary.json"), "w", encoding="utf-8") as handle:
            json.dump({"summary": summary.to_dict(), "problems": problems}, handle, ensure_ascii=False)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(staging, path)
    except OSError as error:  # a read-only or full disk only costs the cache, never the run
        logger.warning("could not cache tokenized data in %s: %s", path, error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_cache(path: str):
    import datasets

    if not os.path.isfile(os.path.join(path, "summary.json")):
        return None
    with open(os.path.join(path, "summary.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    train = datasets.load_from_disk(os.path.join(path, "train"))
    eval_path = os.path.join(path, "eval")
    evaluation = datasets.load_from_disk(eval_path) if os.path.isdir(eval_path) else None
    return train, evaluation, DataSummary(**saved["summary"]), saved["problems"]
