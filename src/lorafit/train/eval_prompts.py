"""`--eval_prompts`: answer a `lorafit eval` prompts file at each evaluation, while the run goes.

Eval loss falls steadily while a small fine-tune overwrites what the base model knew; the answers
show it. At every evaluation this callback answers the prompts greedily (`--eval_prompts_max_new_tokens`,
48 by default), runs their checks (`lorafit.evaluate.checks`), and appends one line to metrics.jsonl:

    {"step": 30, "epoch": 2.0, "eval_prompts": {"identity/name": {"passed": 9, "total": 10}, ...}}

`loss.png` draws the pass rates beside the loss, and the model card lists the last answers
(`eval_prompts.json` holds them). The cost is one batched generation per evaluation: on the
2-core CPU, 24 prompts of 48 tokens take about 10-15 s with the embedded model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from lorafit.evaluate.checks import run_checks
from lorafit.evaluate.prompts import EvalPrompt

logger = logging.getLogger(__name__)

ANSWERS_FILE = "eval_prompts.json"
BATCH = 16


def pass_counts(prompts: list[EvalPrompt], results: list[dict[str, bool]]) -> dict[str, dict[str, int]]:
    """{"group/check": {"passed", "total"}} over every check of every prompt, in file order."""
    counts: dict[str, dict[str, int]] = {}
    for prompt, checks in zip(prompts, results):
        for name, passed in checks.items():
            entry = counts.setdefault(f"{prompt.group}/{name}", {"passed": 0, "total": 0})
            entry["passed"] += int(passed)
            entry["total"] += 1
    return counts


@torch.no_grad()
def answer(model, tokenizer, stop_ids: list[int], prompts: list[EvalPrompt], max_new_tokens: int) -> list[str]:
    """Greedy answers from the model being trained (eval mode and the KV cache for the duration)."""
    from lorafit.evaluate.runner import Column, answer_prompts
    from lorafit.infer.options import GenerationOptions

    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = True
    try:
        completions = answer_prompts(model, Column("training", None, tokenizer, stop_ids), prompts,
                                     GenerationOptions(max_new_tokens=max_new_tokens, temperature=0), BATCH)
        return [completion.text.strip() for completion in completions]
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)


class EvalPromptsCallback(TrainerCallback):
    """Answers and checks `prompts` at each evaluation (main process only), see the module docstring."""

    def __init__(self, prompts: list[EvalPrompt], tokenizer, output_dir: str | Path, max_new_tokens: int = 48):
        from lorafit.data.templates import end_of_turn_token_ids
        from lorafit.train.callbacks import METRICS_FILE

        self.prompts = prompts
        self.tokenizer = tokenizer
        self.stop_ids = end_of_turn_token_ids(tokenizer)
        self.max_new_tokens = max_new_tokens
        self.output_dir = Path(output_dir)
        self.metrics_path = self.output_dir / METRICS_FILE

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        answers = answer(model, self.tokenizer, self.stop_ids, self.prompts, self.max_new_tokens)
        results = [run_checks(p.checks, a) for p, a in zip(self.prompts, answers)]
        counts = pass_counts(self.prompts, results)
        record = {"step": state.global_step, "epoch": state.epoch, "eval_prompts": counts}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        (self.output_dir / ANSWERS_FILE).write_text(json.dumps({
            "step": state.global_step,
            "answers": [{"group": p.group, "prompt": p.prompt, "answer": a, "checks": r}
                        for p, a, r in zip(self.prompts, answers, results)],
        }, ensure_ascii=False, indent=1), encoding="utf-8")
        shown = ", ".join(f"{key} {c['passed']}/{c['total']}" for key, c in counts.items())
        logger.info("eval prompts at step %d: %s", state.global_step, shown or "no checks")


def pass_rate_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """"group/check" -> [(step, pass rate)] from metrics.jsonl records, for loss.png."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, count in (record.get("eval_prompts") or {}).items():
            if count.get("total"):
                series.setdefault(key, []).append((record["step"], count["passed"] / count["total"]))
    return series


def model_card_section(output_dir: str | Path, limit: int = 40) -> list[str]:
    """Markdown lines listing the last `--eval_prompts` answers, or [] when there are none."""
    path = Path(output_dir) / ANSWERS_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    lines = ["## Answers to the evaluation prompts", "",
             f"At the last evaluation (step {data.get('step')}), greedy; ✓ every check passed, ✗ one failed.", "",
             "| group | prompt | answer |", "|---|---|---|"]
    for item in data.get("answers", [])[:limit]:
        mark = "" if not item["checks"] else ("✓ " if all(item["checks"].values()) else "✗ ")
        cells = [item["group"], _cell(item["prompt"], 60), mark + _cell(item["answer"], 100)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cell(text: str, width: int) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[: width - 1] + "…"
