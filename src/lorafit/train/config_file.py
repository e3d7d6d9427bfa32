"""`lorafit_config.yaml`: the resolved arguments of a run, written so `lorafit train <file>` reruns it.

Model, data and LoRA arguments are written in full. Of the ~150 training arguments only those that
differ from their declared default are written (plus a few a reader looks for first), which keeps
the file readable; the declared defaults are the same on rerun. Secrets and per-machine choices
(CPU-only, pinning, automatic bf16) are left out unless the user set them, so the file reruns well
on another machine.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path

import yaml

from lorafit.train.args import LastLayers, TrainConfig

# Never written to lorafit_config.yaml: secrets, and fields that only describe this process.
NOT_WRITTEN = {"hub_token", "push_to_hub_token", "local_rank", "warmup_ratio", "overwrite_output_dir",
               "gradient_checkpointing", "gradient_checkpointing_kwargs"}  # the last two: old names
# Chosen for this machine by _apply_contextual_defaults; written only when the user set them, so the
# file reruns well on another machine.
MACHINE_DEFAULTS = {"use_cpu", "dataloader_pin_memory", "bf16"}


def _plain(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, LastLayers):  # written as given ('last 33%'), resolved again on rerun
        return str(value)
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _field_default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def _is_unset(value) -> bool:
    # TrainingArguments normalises "nothing" differently per field (None, False, [], "none", "").
    return value in (None, False, "", "none") or value == [] or value == {}


def _same_as_default(name: str, value, default) -> bool:
    if value == default or (_is_unset(value) and _is_unset(default)):
        return True
    if name == "accelerator_config" and default is None:
        from transformers.trainer_pt_utils import AcceleratorConfig

        return value == {k: v for k, v in AcceleratorConfig().to_dict().items() if k in value}
    return False


def _dataclass_values(obj, only_changed: bool = False, skip: set[str] = frozenset()) -> dict:
    """Field values as plain YAML types. With `only_changed`, fields equal to their declared default
    are left out (compared with the declaration, not a fresh instance: building TrainingArguments
    can reset the process's distributed state)."""
    plain = obj.to_dict() if hasattr(obj, "to_dict") else {}  # TrainingArguments' own serialisation
    values = {}
    for f in fields(obj):
        if not f.init or f.name in NOT_WRITTEN or f.name in skip or f.name.startswith("_"):
            continue
        value = _plain(plain.get(f.name, getattr(obj, f.name)))
        if only_changed and f.name not in ALWAYS_WRITTEN and _same_as_default(f.name, value, _plain(_field_default(f))):
            continue
        values[f.name] = value
    return values


# The handful of training flags a reader looks for first, written even when left at default.
ALWAYS_WRITTEN = {"output_dir", "learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                  "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
                  "logging_steps", "save_steps"}


def config_sections(config: TrainConfig) -> dict[str, dict]:
    """The resolved arguments, grouped; training arguments left at their default are omitted."""
    return {
        "model": _dataclass_values(config.model),
        "data": _dataclass_values(config.data),
        "lora": _dataclass_values(config.lora),
        "training": _dataclass_values(config.training, only_changed=True, skip=MACHINE_DEFAULTS - config.explicit),
    }


def write_config_yaml(config: TrainConfig, path: str | Path, header: str = "") -> Path:
    """Write a flat YAML file that `lorafit train <file>` reruns, with a comment line per group."""
    path = Path(path)
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    for section, values in config_sections(config).items():
        lines.append(f"\n# --- {section} arguments ---")
        lines.append(yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=120).rstrip())
    path.write_text("\n".join(lines).lstrip("\n") + "\n", encoding="utf-8")
    return path
