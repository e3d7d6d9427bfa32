"""The side-by-side table of `lorafit eval`, and the files it writes (`eval.json`, `eval.md`).

Rows, per group of prompts (in file order):
  <check>    passes of each named check (`pass` for the top-level keys), per model
  all pass   prompts whose every check passed
  kept       for an adapter: of the prompts the base model passed, how many still pass (forgetting)
  distinct   different answers; `!` marks a collapse (one answer to many prompts)
  train ans  answers that are one of the adapter's training answers, to another prompt
Then held-out loss and perplexity (`--eval_file`) and task scores (`--tasks`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorafit.evaluate.collapse import measure_collapse
from lorafit.evaluate.prompts import EvalPrompt
from lorafit.evaluate.runner import ModelResult

ANSWER_WIDTH = 70


@dataclass
class Row:
    group: str
    measure: str
    cells: list[str]  # one per model
    figures: list  # the numbers behind the cells (json)


def groups_in_order(prompts: list[EvalPrompt]) -> list[str]:
    return list(dict.fromkeys(p.group for p in prompts))


def check_names(prompts: list[EvalPrompt]) -> list[str]:
    return list(dict.fromkeys(check.name for p in prompts for check in p.checks))


def group_summary(group: str, prompts: list[EvalPrompt], results: list[ModelResult]) -> list[Row]:
    index = [i for i, p in enumerate(prompts) if p.group == group]
    rows = []
    for name in check_names([prompts[i] for i in index]):
        with_check = [i for i in index if name in results[0].checks[i]]
        counts = [sum(r.checks[i][name] for i in with_check) for r in results]
        rows.append(Row(group, name, [f"{c}/{len(with_check)}" for c in counts], counts))
    checked = [i for i in index if results[0].checks[i]]
    if len(check_names([prompts[i] for i in index])) > 1:
        counts = [sum(all(r.checks[i].values()) for i in checked) for r in results]
        rows.append(Row(group, "all pass", [f"{c}/{len(checked)}" for c in counts], counts))
    base_passed = [i for i in checked if all(results[0].checks[i].values())]
    if base_passed and len(results) > 1:
        kept = [None] + [sum(all(r.checks[i].values()) for i in base_passed) for r in results[1:]]
        rows.append(Row(group, "kept", ["-"] + [f"{k}/{len(base_passed)}" for k in kept[1:]], kept))
    collapses = [measure_collapse([prompts[i].prompt for i in index], [r.answers[i] for i in index],
                                  r.training_pairs) for r in results]
    rows.append(Row(group, "distinct", [f"{c.distinct}/{c.prompts}" + (" !" if c.same_answer else "")
                                        for c in collapses], [c.as_dict() for c in collapses]))
    if any(c.training_answers for c in collapses):
        rows.append(Row(group, "train ans", ["-" if c.training_answers is None else str(c.training_answers)
                                             for c in collapses], [c.training_answers for c in collapses]))
    return rows


def summarize(prompts: list[EvalPrompt], results: list[ModelResult]) -> list[Row]:
    rows = []
    if prompts:
        for group in groups_in_order(prompts):
            rows += group_summary(group, prompts, results)
    if any(r.eval_loss is not None for r in results):
        rows.append(Row("held-out", "loss", [_number(r.eval_loss) for r in results], [r.eval_loss for r in results]))
        rows.append(Row("held-out", "perplexity", [_number(r.perplexity, 2) for r in results],
                        [r.perplexity for r in results]))
    task_metrics = dict.fromkeys(key for r in results for key in (r.tasks or {}))
    for key in task_metrics:
        values = [(r.tasks or {}).get(key) for r in results]
        task, _, metric = key.partition(":")
        rows.append(Row(f"task {task}", metric, [_number(v) for v in values], values))
    return rows


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def warnings_for(rows: list[Row], labels: list[str]) -> list[str]:
    notes = []
    for row in rows:
        if row.measure == "distinct":
            for label, figure in zip(labels, row.figures):
                if figure["same_answer"]:
                    notes.append(f"{label}: the same answer to {figure['largest_same']} of {figure['prompts']} "
                                 f"{row.group} prompts (collapse)")
        if row.measure == "train ans":
            for label, count in zip(labels, row.figures):
                if count:
                    notes.append(f"{label}: {count} {row.group} answer(s) are training answers given to other prompts")
    return notes


def format_table(rows: list[Row], labels: list[str]) -> str:
    header = ["group", "measure", *labels]
    body = [[row.group, row.measure, *row.cells] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(line, widths))).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _short(text: str, width: int = ANSWER_WIDTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_report(prompts: list[EvalPrompt], results: list[ModelResult], rows: list[Row]) -> str:
    labels = [r.label for r in results]
    lines = ["# lorafit eval", "", "| group | measure | " + " | ".join(map(_md, labels)) + " |",
             "|---|---|" + "---:|" * len(labels)]
    lines += [f"| {_md(row.group)} | {row.measure} | " + " | ".join(row.cells) + " |" for row in rows]
    notes = warnings_for(rows, labels)
    if notes:
        lines += ["", *[f"- **warning** {_md(note)}" for note in notes]]
    if prompts:
        lines += ["", "## Answers", "", "✓: every check passed, ✗: a check failed (which one is in eval.json).", "",
                  "| group | prompt | " + " | ".join(map(_md, labels)) + " |", "|---|---|" + "---|" * len(labels)]
        for i, prompt in enumerate(prompts):
            cells = []
            for result in results:
                mark = "" if not result.checks[i] else ("✓ " if all(result.checks[i].values()) else "✗ ")
                cells.append(mark + _md(_short(result.answers[i])))
            lines.append(f"| {_md(prompt.group)} | {_md(_short(prompt.prompt, 50))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def json_report(prompts: list[EvalPrompt], results: list[ModelResult], rows: list[Row], settings: dict) -> dict:
    return {
        "settings": settings,
        "models": [{"label": r.label, "adapter": r.adapter,
                    "adapter_scale": None if r.adapter is None else r.adapter_scale,
                    "eval_loss": r.eval_loss, "eval_tokens": r.eval_tokens,
                    "perplexity": r.perplexity, "tasks": r.tasks} for r in results],
        "summary": [{"group": row.group, "measure": row.measure,
                     "values": dict(zip([r.label for r in results], row.figures))} for row in rows],
        "prompts": [{"source": p.source, "group": p.group, "prompt": p.prompt,
                     "answers": {r.label: {"text": r.answers[i], "finish_reason": r.finish_reasons[i],
                                           "checks": r.checks[i]} for r in results}}
                    for i, p in enumerate(prompts)],
    }


def write_reports(output_dir: Path, prompts, results, rows, settings: dict) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "eval.json", output_dir / "eval.md"
    json_path.write_text(json.dumps(json_report(prompts, results, rows, settings), ensure_ascii=False, indent=1),
                         encoding="utf-8")
    md_path.write_text(markdown_report(prompts, results, rows), encoding="utf-8")
    return json_path, md_path
