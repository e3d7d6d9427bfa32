"""The model card (`README.md`) written beside a trained adapter: what it is, how it was made, how to load it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import yaml

import lorafit
from lorafit.train.args import TrainConfig
from lorafit.train.config_file import config_sections
from lorafit.train.callbacks import LOSS_PLOT_FILE, METRICS_FILE, read_metrics

CONFIG_FILE = "lorafit_config.yaml"


def final_metrics(metrics_path: Path) -> dict:
    """The last logged value of each headline metric (train loss, eval loss, perplexity, ...)."""
    wanted = ("loss", "eval_loss", "eval_perplexity", "trained_tokens", "train_runtime", "train_loss")
    found = {}
    for record in read_metrics(metrics_path):
        for key in wanted:
            if record.get(key) is not None:
                found[key] = record[key]
                found[f"{key}_step"] = record.get("step")
    return found


def _format_metrics(metrics: dict) -> str:
    labels = {"loss": "last logged train loss", "train_loss": "mean train loss over the run",
              "eval_loss": "eval loss", "eval_perplexity": "eval perplexity",
              "trained_tokens": "trained (label) tokens", "train_runtime": "training time (s)"}
    rows = [f"| {label} | {metrics[key]:.4g} |" if isinstance(metrics[key], float) else f"| {label} | {metrics[key]} |"
            for key, label in labels.items() if key in metrics]
    if not rows:
        return "No metrics were logged."
    return "| metric | value |\n|---|---|\n" + "\n".join(rows)


def _usage(config: TrainConfig, base_path: str, output_dir: Path) -> str:
    folder = str(output_dir)
    if not config.lora.use_peft:
        return (
            "This folder is a full model (every weight was trained):\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({folder!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({folder!r})\n```\n"
        )
    return (
        "With lorafit:\n\n"
        "```python\nimport lorafit\nfrom lorafit.models import load_model, load_tokenizer\n"
        f"model = lorafit.load_adapter(load_model({base_path!r}), {folder!r})\n"
        f"tokenizer = load_tokenizer({folder!r})  # carries the chat template used in training\n```\n\n"
        "With PEFT:\n\n"
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"base = AutoModelForCausalLM.from_pretrained({base_path!r})\n"
        f"model = PeftModel.from_pretrained(base, {folder!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({folder!r})\n```\n\n"
        "Fold the adapter into the base for deployment with `lorafit merge`."
    )


def _eval_prompt_lines(output_dir: Path) -> list[str]:
    from lorafit.train.eval_prompts import model_card_section

    lines = model_card_section(output_dir)
    return [*lines, ""] if lines else []


def write_model_card(config: TrainConfig, output_dir: str | Path, base_path: str, data_summary: str = "") -> Path:
    output_dir = Path(output_dir)
    metrics = final_metrics(output_dir / METRICS_FILE)
    sections = config_sections(config)
    kind = "LoRA adapter" if config.lora.use_peft else "fully fine-tuned model"
    base_name = config.model.model_name_or_path
    data_files = config.data.train_file if hasattr(config.data, "train_file") else None
    lines = [
        f"# {output_dir.name}: a {kind} for {base_name}",
        "",
        f"Trained with lorafit {lorafit.__version__} on {dt.date.today().isoformat()}.",
        "",
    ]
    if config.lora.adapter_scale != 1.0:  # only LoRA runs get past argument checks with it
        lines += [f"The saved update is the trained one times {config.lora.adapter_scale:g} (`adapter_scale`: a "
                  "WiSE-FT interpolation toward the base model); the results below are the saved adapter's.", ""]
    lines += [
        "## Base model",
        "",
        f"`{base_name}`, loaded from `{base_path}` (this is the adapter's `base_model_name_or_path`).",
        "",
        "## Data",
        "",
        f"Training files: {', '.join(f'`{f}`' for f in data_files) if data_files else 'see lorafit_config.yaml'}.",
    ]
    if data_summary:
        lines += ["", "```", data_summary.strip(), "```"]
    lines += [
        "",
        "## Results",
        "",
        _format_metrics(metrics),
        "",
        f"![loss curve]({LOSS_PLOT_FILE})  (every log line is in `{METRICS_FILE}`)",
        "",
        *_eval_prompt_lines(output_dir),
        "## How to load",
        "",
        _usage(config, base_path, output_dir),
        "",
        "## Arguments",
        "",
        f"Every argument is in `{CONFIG_FILE}`; `lorafit train {CONFIG_FILE}` reruns it. LoRA and model:",
        "",
        "```yaml",
        yaml.safe_dump({**sections["model"], **sections["lora"]}, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
