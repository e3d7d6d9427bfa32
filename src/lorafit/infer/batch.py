"""`lorafit generate`: answer every prompt of a JSONL file, writing one output line per input line.

Input lines are `{"prompt": ..., "system"?: ..., "history"?: [[user, assistant], ...]}` (the
training format) or `{"messages": [{"role", "content"}, ...]}`. Each output line is the input
object plus `"response"`; with `--adapter` given more than once, plus `"responses": {name: answer}`,
every adapter's answer side by side (their rows share one batch). Prompts are answered by continuous batching (`lorafit.infer.engine`), and
a line is written (and flushed) as soon as it and every line before it are answered, so a stopped
run keeps a whole prefix of the file; `--resume` continues it.

Every record is checked before anything is generated (its shape before the model loads, its
rendering and length right after); bad ones are listed as `path:line: reason` and nothing is written
(exit code 2), unless `--on_bad_record skip` leaves them out. Invalid UTF-8, invalid JSON (a number
too long to read and nesting too deep included), text that is not Unicode (a lone surrogate) and
nesting past 64 levels are bad records as in training data (`lorafit.data.json_records`), never a
traceback; a byte order mark is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.errors import UserError
from lorafit.infer.engine import BatchingEngine, context_length
from lorafit.infer.loading import LoadedModel, add_model_arguments, load_from_args
from lorafit.infer.options import GenerationOptions, add_generation_arguments, options_from_args

ROLES = ("system", "user", "assistant", "tool")
SORT_WINDOW_BATCHES = 4  # prompts are sorted by length within windows of this many batches


@dataclass
class PromptRecord:
    source: str  # "path:line"
    record: dict  # the input object, echoed to the output
    messages: list[dict]
    prompt_ids: list[int] | None = None  # the rendered prompt, filled in by `render_prompts`
    # with several adapters: each adapter's rendering (its own chat template), by adapter name
    prompts: dict[str, list[int]] = field(default_factory=dict)


def messages_from_record(record) -> list[dict]:
    """A conversation ending in a user turn, from either input shape; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(record)}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise ValueError(f'"messages"[{index}] must be {{"role": one of {"/".join(ROLES)}, "content": a string}}')
        if messages[-1]["role"] == "assistant":
            raise ValueError('the last message is already an assistant reply: nothing to answer')
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if not isinstance(record.get("prompt"), str):
        raise ValueError('needs a string "prompt" (or a "messages" list)')
    messages = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise ValueError('"system" must be a string')
        if system:
            messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise ValueError('"history" must be a list of [user, assistant] pairs')
    for index, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ValueError(f'"history"[{index}] must be a [user, assistant] pair of strings')
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages.append({"role": "user", "content": record["prompt"]})
    return messages


def _json_type(value) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_prompts(path: Path, on_bad_record: str = "error") -> tuple[list[PromptRecord], list[tuple[str, str]]]:
    """All records of a JSONL file, and the bad ones as (path:line, reason)."""
    from lorafit.data.json_records import parse_json, unusable_value

    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    records, problems = [], []
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                source = f"{path}:{number}"
                try:
                    text = raw.decode("utf-8").lstrip("\ufeff").strip()
                except UnicodeDecodeError as error:
                    problems.append((source, f"not valid UTF-8 (byte 0x{raw[error.start:error.start + 1].hex()} "
                                             f"at column {error.start + 1})"))
                    continue
                if not text:
                    continue
                record, problem = parse_json(text)
                if problem is not None:
                    at = f" at column {problem.column}" if problem.column else ""
                    problems.append((source, f"not valid JSON ({problem.message}{at})"))
                    continue
                try:
                    reason = unusable_value(record)
                    if reason:
                        raise ValueError(reason)
                    records.append(PromptRecord(source, record, messages_from_record(record)))
                except ValueError as error:
                    problems.append((source, str(error)))
    except OSError as error:
        raise UserError(f"--input {path}: cannot read the file ({error.strerror or error})") from None
    if problems and on_bad_record == "error":
        from lorafit.data.errors import BadRecordsError

        raise BadRecordsError(problems)
    return records, problems


def render_prompts(loaded: LoadedModel, records: list[PromptRecord], on_bad_record: str = "error"
                   ) -> tuple[list[PromptRecord], list[tuple[str, str]]]:
    """Render every prompt with the model's template up front, so a record the template refuses, or
    one longer than the context, is found before the first answer rather than halfway through."""
    from lorafit.data.render import render_prompt

    limit = context_length(loaded.model)
    kept, problems = [], []
    for item in records:
        problem = None
        for answerer in loaded.compared:
            where = f" of {answerer.name}" if loaded.adapters else ""
            try:
                ids = render_prompt(answerer.tokenizer, item.messages)
            except ValueError as error:  # the template refused the conversation
                problem = f"the chat template{where} cannot render it: {error}"
                break
            if limit is not None and len(ids) >= limit:
                problem = f"the prompt{where} has {len(ids)} tokens; the model's context is {limit}"
                break
            item.prompts[answerer.name] = ids
        if problem is not None:
            problems.append((item.source, problem))
            continue
        item.prompt_ids = item.prompts[loaded.compared[0].name]
        kept.append(item)
    if problems and on_bad_record == "error":
        from lorafit.data.errors import BadRecordsError

        raise BadRecordsError(problems)
    return kept, problems


def completed_lines(output: Path) -> int:
    """How many whole lines a previous run wrote; a half-written last line is cut off."""
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with output.open("r+b") as handle:
            handle.truncate(len(complete))
    return complete.count(b"\n")


def answer_all(loaded: LoadedModel, records: list[PromptRecord], options: GenerationOptions,
               batch_size: int, output, progress=None, first_index: int = 0) -> int:
    """Generate the answers with the batching engine and write them in input order; returns how
    many were written.

    Up to `batch_size` prompts decode together; a finished one makes room for the next at once.
    Within each window of `SORT_WINDOW_BATCHES * batch_size` records, prompts join in order of
    length, so those prefilled together need little padding; an answer is written as soon as every
    line before it is, so a stopped run keeps a whole prefix of the file. With a seed, record i
    (counted from the start of the file, `first_index` for a resumed run) samples with seed + i,
    so its answer depends neither on its neighbours nor on where a run was resumed.

    With several adapters each record is answered by every adapter (their rows share the batch)
    and its line holds `"responses": {adapter name: answer}` instead of `"response"`."""
    if any(not item.prompts for item in records):
        records, _ = render_prompts(loaded, records)
    answerers = loaded.compared
    engine = BatchingEngine(loaded.model, loaded.tokenizer, stop_token_ids=loaded.stop_token_ids,
                            pad_token_id=loaded.tokenizer.pad_token_id, max_batch_size=batch_size)
    requests = [None] * len(records)
    window = SORT_WINDOW_BATCHES * batch_size
    for start in range(0, len(records), window):
        for index in sorted(range(start, min(start + window, len(records))), key=lambda i: len(records[i].prompt_ids)):
            seed = None if options.seed is None else (options.seed + first_index + index) % 2**64
            requests[index] = [engine.submit(records[index].prompts[a.name], options.updated(seed=seed),
                                             stop_token_ids=a.stop_token_ids, adapter_id=a.adapter_id)
                               for a in answerers]
    written = 0
    while written < len(records):
        engine.step()
        ready = written
        while ready < len(records) and all(request.done.done() for request in requests[ready]):
            texts = [request.done.result().text for request in requests[ready]]
            answer = {"responses": {a.name: text for a, text in zip(answerers, texts)}} if loaded.adapters \
                else {"response": texts[0]}
            output.write(json.dumps({**records[ready].record, **answer}, ensure_ascii=False) + "\n")
            ready += 1
        if ready > written:
            output.flush()
            if progress is not None:
                progress.update(ready - written)
            written = ready
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafit generate",
        description='Answer every prompt of a JSONL file. Input lines: {"prompt", "system"?, "history"?} or '
                    '{"messages": [...]}; output lines: the input plus "response", written as they finish.',
    )
    parser.add_argument("--input", required=True, type=Path, help="prompts, one JSON object per line")
    parser.add_argument("--output", required=True, type=Path, help="where to write the answers (JSON Lines)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="the most prompts decoded together; a finished answer makes room for the next "
                             "(continuous batching; default: 8)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped run: keep the lines already in --output and answer the rest")
    parser.add_argument("--overwrite", action="store_true", help="replace --output when it exists")
    parser.add_argument("--on_bad_record", choices=("error", "skip"), default="error",
                        help="error: list bad input lines and stop before generating (default); skip: leave them out")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    return parser


def report_skipped(problems: list[tuple[str, str]]) -> None:
    for source, reason in problems:
        print(f"skipping {source}: {reason}", file=sys.stderr)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    records, problems = read_prompts(args.input, args.on_bad_record)
    report_skipped(problems)
    if args.output.exists() and not (args.resume or args.overwrite):
        raise UserError(f"--output {args.output} exists: pass --resume to continue it or --overwrite to replace it")
    loaded = load_from_args(args)
    records, problems = render_prompts(loaded, records, args.on_bad_record)
    report_skipped(problems)
    done = completed_lines(args.output) if args.resume and args.output.exists() else 0
    if done > len(records):
        raise UserError(f"--output {args.output} has {done} lines but --input has only {len(records)} prompts")
    args.output.parent.mkdir(parents=True, exist_ok=True)

    from lorafit.plain_output import progress

    with args.output.open("a" if args.resume else "w", encoding="utf-8") as output, \
            progress(len(records), initial=done, unit="prompt", desc="generate") as shown:
        answer_all(loaded, records[done:], options, args.batch_size, output, shown, first_index=done)
    print(f"wrote {len(records)} answers to {args.output}" + (f" ({done} from before)" if done else ""),
          file=sys.stderr)
    return 0
