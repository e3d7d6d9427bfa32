"""The data preview: what `lorafit data inspect` shows, as data for the page.

Nothing here reads or renders data itself: the files go through `lorafit.data.pipeline.build_datasets`
(the same call, the same cache as `lorafit train`, so the run that follows reuses the tokenized
data), the trained spans come from `lorafit.data.inspect.trained_runs` and the summary and padding
line from `DataSummary.format` and `inspect.efficiency_line`. Bad records are the pipeline's
`BadRecordsError` (with `--on_bad_record error`) or its `rejected.jsonl` (with `skip`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from lorafit.data.errors import BadRecordsError
from lorafit.errors import UserError
from lorafit.train.args import TrainConfig
from lorafit.ui.checks import form_error
from lorafit.ui.form import FormError

DEFAULT_LIMIT = 5


class TokenizerCache:
    """One tokenizer per model folder for the page's process, each time handed out with its own chat
    template again (building data installs the run's template on it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loaded: dict[tuple, tuple[object, object]] = {}

    def get(self, model_path: str, tokenizer_name: str | None, trust_remote_code: bool):
        from lorafit.models import load_tokenizer

        key = (model_path, tokenizer_name, trust_remote_code)
        with self._lock:
            if key not in self._loaded:
                tokenizer = load_tokenizer(tokenizer_name or model_path, trust_remote_code=trust_remote_code)
                self._loaded[key] = (tokenizer, tokenizer.chat_template)
            tokenizer, own_template = self._loaded[key]
            tokenizer.chat_template = own_template
            return tokenizer


def detected_formats(files: list[str], options) -> dict[str, str]:
    """Each file's format as `--data_format auto` detects it: from its first good record."""
    from lorafit.data.errors import BadRecordError
    from lorafit.data.formats import Rejection, detect_format
    from lorafit.data.json_records import json_records

    detected = {}
    for path in files:
        detected[path] = "unknown (no good record)"
        try:
            for _source, item, _raw in json_records(path):
                if isinstance(item, dict) and not isinstance(item, Rejection):
                    try:
                        detected[path] = detect_format(item, options)
                        break
                    except BadRecordError:
                        continue
        except OSError as error:
            detected[path] = f"unreadable ({error.strerror or error})"
    return detected


def template_description(template: str) -> str:
    if template == "auto":
        return "auto: the model's own chat template"
    return template


def preview(config: TrainConfig, tokenizers: TokenizerCache, scratch_dir: Path,
            limit: int = DEFAULT_LIMIT) -> dict:
    """Rendered examples with trained spans, the data summary and the bad records, or a FormError
    whose message is the one `lorafit data inspect` / `lorafit train` prints."""
    from lorafit.data.formats import FormatOptions, resolve_files
    from lorafit.data.inspect import InspectArguments, efficiency_line, trained_runs
    from lorafit.data.pipeline import build_datasets
    from lorafit.data.render import IGNORE_INDEX
    from lorafit.models import resolve_model_path

    try:
        model_path = resolve_model_path(config.model.model_name_or_path)
        tokenizer = tokenizers.get(model_path, config.model.tokenizer_name_or_path, config.model.trust_remote_code)
    except UserError as error:
        raise form_error(error, "model_name_or_path") from None
    scratch_dir.mkdir(parents=True, exist_ok=True)
    (scratch_dir / "rejected.jsonl").unlink(missing_ok=True)
    data = config.data
    try:
        files = resolve_files(data.train_file, "--train_file") if data.train_file else []
        prepared = build_datasets(data, tokenizer, output_dir=str(scratch_dir), seed=config.training.seed,
                                  keep_source=True)
    except BadRecordsError as error:
        failure = FormError({"train_file": str(error)})  # the message names --on_bad_record too: the file is what is wrong
        failure.bad_records = [{"source": source, "reason": reason} for source, reason in error.problems]
        raise failure from None
    except UserError as error:
        raise form_error(error, "train_file") from None
    train = prepared.train
    streaming = not hasattr(train, "select")  # --streaming: an IterableDataset, read lazily
    rows = list(train.take(limit) if streaming else train.select(range(min(limit, len(train)))))
    examples = [{"source": row["source"], "tokens": len(row["input_ids"]),
                 "trained": sum(label != IGNORE_INDEX for label in row["labels"]),
                 "runs": [{"text": text, "trained": trained}
                          for text, trained in trained_runs(tokenizer, list(row["input_ids"]), list(row["labels"]))]}
                for row in rows]
    inspect_args = InspectArguments(per_device_train_batch_size=config.training.per_device_train_batch_size,
                                    seed=config.training.seed)
    lengths = [len(row["input_ids"]) for row in rows] if streaming else [len(ids) for ids in train["input_ids"]]
    return {
        "examples": examples,
        "summary": prepared.summary.to_dict(),
        "summary_text": prepared.summary.format() + "\n" + efficiency_line(lengths, data, inspect_args),
        "bad_records": _rejected(scratch_dir / "rejected.jsonl"),
        "formats": detected_formats(files, FormatOptions.from_args(data)),
        "template": template_description(data.template_choice),
    }


def _rejected(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"source": row.get("source"), "reason": row.get("reason")} for row in rows]
