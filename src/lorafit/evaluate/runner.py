"""Base model and adapters side by side, from one loaded copy of the base weights.

The base model loads once. Its column is answered first; then each adapter in turn is injected,
merged into the weights with the originals kept (`merge_lora(keep_wrappers=True)`), answered, and
taken out again (`remove_lora`, which puts the original weights back bit for bit). Merged weights
are what `lorafit chat`/`generate`/`serve` run, so every column equals the answers of the same
model loaded on its own (greedy decoding; `tests/evaluate/test_runner.py` checks it).

Each column renders prompts with its own tokenizer: an adapter's saved chat template, as
`lorafit chat --adapter` would use it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafit.evaluate.checks import run_checks
from lorafit.evaluate.collapse import training_pairs_from_conversations
from lorafit.evaluate.prompts import EvalPrompt

logger = logging.getLogger(__name__)

BASE_LABEL = "base"


@dataclass
class ModelResult:
    """Everything measured for one column (the base model, or the base plus one adapter)."""

    label: str
    adapter: str | None
    adapter_scale: float = 1.0  # the adapter's update times this (1: as trained; lorafit.lora.rescale)
    answers: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    checks: list[dict[str, bool]] = field(default_factory=list)
    eval_loss: float | None = None
    eval_tokens: int = 0
    tasks: dict | None = None
    training_pairs: dict | None = None  # normalized training answer -> prompts (collapse measure)

    @property
    def perplexity(self) -> float | None:
        if self.eval_loss is None:
            return None
        return math.exp(self.eval_loss) if self.eval_loss < 50 else float("inf")


@dataclass
class Column:
    label: str
    adapter: Path | None
    tokenizer: object
    stop_ids: list[int]


def column_labels(adapters: list[Path]) -> list[str]:
    """'base', then each adapter's folder name (made unique with its parent folders if needed)."""
    labels = [BASE_LABEL]
    for adapter in adapters:
        parts = adapter.resolve().parts
        depth = 1
        label = parts[-1]
        while (label in labels) and depth < len(parts):
            depth += 1
            label = "/".join(parts[-depth:])
        labels.append(label)
    return labels


@contextlib.contextmanager
def adapter_applied(model, adapter: Path | None, scale: float = 1.0):
    """The model with `adapter` merged into its weights for the duration (nothing for the base); with
    `scale`, its update times that factor (`lorafit.lora.rescale`: t along the line from the base)."""
    if adapter is None:
        yield model
        return
    from lorafit.errors import UserError
    from lorafit.lora import load_adapter, merge_lora
    from lorafit.lora.merge import remove_lora
    from lorafit.lora.rescale import scale_update

    load_adapter(model, adapter)
    if scale != 1.0:
        try:
            scale_update(model, scale)
        except ValueError as error:
            remove_lora(model)
            raise UserError(f"--adapter_scales: {adapter}: {error}") from None
    merge_lora(model, keep_wrappers=True)
    try:
        yield model
    finally:
        remove_lora(model)


def answer_prompts(model, column: Column, prompts: list[EvalPrompt], options, batch_size: int):
    """Greedy (or as `options` say) answers to every prompt, by the batching engine."""
    from lorafit.data.render import render_prompt
    from lorafit.infer.engine import BatchingEngine

    engine = BatchingEngine(model, column.tokenizer, stop_token_ids=column.stop_ids,
                            pad_token_id=column.tokenizer.pad_token_id, max_batch_size=batch_size)
    requests = [engine.submit(render_prompt(column.tokenizer, list(p.messages)), options) for p in prompts]
    engine.run_until_idle()
    return [request.done.result() for request in requests]


@torch.inference_mode()
def held_out_loss(model, tokenizer, conversations: list, stop_ids: list[int],
                  max_length: int | None) -> tuple[float, int]:
    """Mean loss per trained token (assistant turns, end of turn included) over `conversations`."""
    from lorafit.data.render import IGNORE_INDEX, labels_for, tokenize_conversation

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for messages in conversations:
        rendered = tokenize_conversation(tokenizer, messages, end_of_turn_ids=stop_ids)
        ids, labels = rendered.input_ids, labels_for(rendered)
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        targets = torch.tensor(labels[1:], device=device)
        trained = targets != IGNORE_INDEX
        if not trained.any():
            continue
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits[trained].float(), targets[trained], reduction="sum")
        total += losses.item()
        count += int(trained.sum())
    if count == 0:
        return float("nan"), 0
    return total / count, count


def training_pairs_for(adapter: Path) -> dict | None:
    """The adapter's training answers, from the train files its `lorafit_config.yaml` names (when
    they are still there); None when they cannot be found."""
    config = adapter / "lorafit_config.yaml"
    if not config.is_file():
        return None
    import yaml

    from lorafit.data.formats import Conversation, FormatOptions, read_records

    try:
        settings = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    files = settings.get("train_file") or []
    options = FormatOptions(**{key: settings[key] for key in ("data_format", "prompt_column", "response_column",
                                                              "history_column", "system_column") if key in settings})
    conversations = []
    for name in files if isinstance(files, list) else [files]:
        path = next((p for p in (Path(name), adapter / name) if p.is_file()), None)
        if path is None:
            logger.info("eval: %s's training file %s is not there; training answers are not compared", adapter, name)
            return None
        try:
            conversations += [item.messages for item in read_records(str(path), options)
                              if isinstance(item, Conversation)]
        except Exception as error:  # a changed or unreadable file: the measure is skipped, not the eval
            logger.info("eval: cannot read %s (%s); training answers are not compared", path, error)
            return None
    return training_pairs_from_conversations(conversations)


def score(result: ModelResult, prompts: list[EvalPrompt]) -> None:
    result.checks = [run_checks(prompt.checks, answer) for prompt, answer in zip(prompts, result.answers)]


def evaluate_columns(base: str | None, adapters: list[Path], labels: list[str], *, prompts: list[EvalPrompt],
                     options, conversations: list | None = None, tasks=None, template: str = "auto",
                     dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
                     batch_size: int = 8, max_length: int | None = None,
                     scales: list[float] | None = None) -> list[ModelResult]:
    """Load `base` once and measure it, then base + each adapter: answers and checks for `prompts`,
    held-out loss over `conversations`, and lm-eval `tasks` (a `harness.TaskRequest`). `scales`, one
    per adapter, multiplies that adapter's update (default 1: as trained)."""
    from lorafit.data.templates import end_of_turn_token_ids
    from lorafit.infer.cpu_linear import use_onednn_linear
    from lorafit.infer.engine import context_length
    from lorafit.infer.loading import load_inference_tokenizer, resolve_device, resolve_dtype
    from lorafit.models import load_model

    if scales is not None and len(scales) != len(adapters):
        raise ValueError(f"{len(scales)} scales for {len(adapters)} adapters: give one per adapter")
    target = resolve_device(device)
    model = load_model(base, dtype=resolve_dtype(dtype, target), trust_remote_code=trust_remote_code)
    model.to(target).eval()
    use_onednn_linear(model)
    limit = max_length or context_length(model)
    results = []
    for label, adapter, scale in zip(labels, [None, *adapters], [1.0, *(scales or [1.0] * len(adapters))]):
        tokenizer = load_inference_tokenizer(base, adapter, template, trust_remote_code)
        column = Column(label, adapter, tokenizer, end_of_turn_token_ids(tokenizer))
        result = ModelResult(label, None if adapter is None else str(adapter), scale)
        logger.info("eval: %s", label)
        with adapter_applied(model, adapter, scale):
            if prompts:
                completions = answer_prompts(model, column, prompts, options, batch_size)
                result.answers = [c.text.strip() for c in completions]
                result.finish_reasons = [c.finish_reason for c in completions]
                score(result, prompts)
            if conversations:
                result.eval_loss, result.eval_tokens = held_out_loss(model, tokenizer, conversations,
                                                                     column.stop_ids, limit)
            if tasks is not None:
                result.tasks = tasks.run(model, tokenizer)
        if adapter is not None:
            result.training_pairs = training_pairs_for(adapter)
        results.append(result)
    return results
