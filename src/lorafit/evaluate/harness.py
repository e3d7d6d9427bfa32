"""Benchmark tasks through EleutherAI's lm-evaluation-harness (`pip install 'lorafit[eval]'`).

lm-eval is handed the model lorafit already loaded (with the adapter of the current column merged
in) through its `HFLM` wrapper, never a name to load again. Its usual task data comes from the
Hugging Face Hub, which an offline machine cannot reach; a task can instead read a local file:

    # tasks/capitals.yaml, used with --tasks capitals --include_path tasks/
    task: capitals
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/capitals.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: "{{choices}}"
    doc_to_target: answer
    metric_list: [{metric: acc}]

Each task's metrics come back as `"<task>:<metric>"` -> value (stderr entries dropped).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lorafit.errors import UserError

logger = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'lorafit[eval]'"


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"--tasks needs lm-evaluation-harness, which is not installed: {EXTRA_HINT}") from None
    return lm_eval


@dataclass
class TaskRequest:
    tasks: list[str]
    include_path: str | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    _manager: object = field(default=None, init=False, repr=False)

    @classmethod
    def from_args(cls, args) -> "TaskRequest":
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise UserError("--tasks: give at least one task name (comma-separated)")
        limit = args.limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        request = cls(tasks, args.include_path, limit, args.num_fewshot, args.batch_size)
        request.check_tasks()
        return request

    def task_manager(self):
        """lm-eval's task index, built once. Indexing lm-eval's own ~15,000 task files takes most
        of a minute on a laptop CPU, so when every task is found in `--include_path` alone, only
        that folder is indexed."""
        if self._manager is None:
            require_lm_eval()
            from lm_eval.tasks import TaskManager

            if self.include_path:
                local = TaskManager(include_path=self.include_path, include_defaults=False)
                if all(task in local.all_tasks for task in self.tasks):
                    self._manager = local
                    return local
            self._manager = TaskManager(include_path=self.include_path)
        return self._manager

    def check_tasks(self) -> None:
        """Unknown task names are a user error before any model loads (with the closest names)."""
        import difflib

        known = set(self.task_manager().all_tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, known, n=3)
                hints.append(f"{name}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            where = f" in lm-eval or {self.include_path}" if self.include_path else " in lm-eval (add --include_path?)"
            raise UserError(f"--tasks: unknown task(s){where}: " + "; ".join(hints))

    def run(self, model, tokenizer) -> dict[str, float]:
        """The tasks' metrics for the model as it is now."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        device = str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, device=device)
        output = simple_evaluate(model=lm, tasks=self.tasks, num_fewshot=self.num_fewshot, limit=self.limit,
                                 task_manager=self.task_manager(), log_samples=False, verbosity="ERROR",
                                 bootstrap_iters=0)
        metrics = {}
        for task, values in (output or {}).get("results", {}).items():
            for key, value in values.items():
                name = key.split(",")[0]
                if "stderr" in name or name == "alias" or not isinstance(value, (int, float)):
                    continue
                metrics[f"{task}:{name}"] = float(value)
        return metrics
