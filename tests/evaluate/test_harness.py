"""lm-evaluation-harness on a local multiple-choice task, offline, handed the already-loaded model.

The task's right answers are the adapter's own preferences (its most likely choice, computed here
the way lm-eval scores a choice: the summed log-probability of the choice's tokens after the
question), so the adapter column must score exactly 1.0; the base column, which prefers other
choices, must not, which shows that lm-eval ran the model with the adapter merged in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lorafit.evaluate.harness import TaskRequest  # noqa: E402
from lorafit.evaluate.runner import evaluate_columns  # noqa: E402
from lorafit.infer.options import GenerationOptions  # noqa: E402

QUESTIONS = ["the sky", "a lemon", "the sea", "grass", "snow", "a cherry", "coal", "an orange", "the sun", "a plum",
             "ash", "milk"]
CHOICES = ["blue", "yellow", "green", "white"]


@torch.inference_mode()
def preferred_choice(model, tokenizer, context: str) -> int:
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    scores = []
    for choice in CHOICES:
        whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
        continuation = whole[len(context_ids):]
        logits = model(torch.tensor([whole])).logits[0, len(context_ids) - 1:-1].log_softmax(-1)
        scores.append(sum(logits[i, token].item() for i, token in enumerate(continuation)))
    return max(range(len(CHOICES)), key=scores.__getitem__)


def write_task(folder: Path, answers: list[int]) -> None:
    data = folder / "colours.jsonl"
    data.write_text("".join(json.dumps({"question": f"What colour is {q}?", "choices": CHOICES, "answer": a}) + "\n"
                            for q, a in zip(QUESTIONS, answers)))
    (folder / "colours.yaml").write_text(
        "task: lorafit_colours\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")


def test_local_task_scores_the_adapter_column(tiny_model_dir, two_adapters, tmp_path):
    import lorafit
    from lorafit.models import load_model, load_tokenizer

    model = lorafit.load_adapter(load_model(tiny_model_dir), two_adapters[0]).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    answers = [preferred_choice(model, tokenizer, f"Question: What colour is {q}?\nAnswer:") for q in QUESTIONS]
    write_task(tmp_path, answers)

    request = TaskRequest(["lorafit_colours"], include_path=str(tmp_path), batch_size=4)
    request.check_tasks()
    results = evaluate_columns(tiny_model_dir, [Path(two_adapters[0])], ["base", "a"], prompts=[],
                               options=GenerationOptions(temperature=0), tasks=request, dtype="float32", device="cpu")
    assert results[1].tasks["lorafit_colours:acc"] == 1.0
    assert results[0].tasks["lorafit_colours:acc"] < 1.0


def test_an_unknown_task_is_a_user_error_naming_it(tmp_path):
    from lorafit.errors import UserError

    with pytest.raises(UserError, match="unknown task.*no_such_task_xyz"):
        TaskRequest(["no_such_task_xyz"], include_path=str(tmp_path)).check_tasks()
