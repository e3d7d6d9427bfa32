"""`lorafit merge` with several adapters: their weighted combination, as one adapter folder.

    lorafit merge --adapter a --adapter b --adapter_weights 0.7 0.3 --adapter_only --output_dir ab
    lorafit merge --adapter a --adapter b --adapter_weights 0.7 0.3 --output_dir merged   # full model

The combination (`lorafit.lora.weighted`: "cat", exact, or "linear", PEFT's approximation) is
written as an ordinary adapter folder, with the first adapter's tokenizer and chat template beside
it, so `lorafit chat`, `serve` and PEFT load it as they load any adapter. The folder is built beside
its destination and moved into place once complete.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from lorafit.errors import UserError
from lorafit.infer.loading import TOKENIZER_FILES
from lorafit.infer.staging import check_output_folder, staged_folder
from lorafit.lora.adapter_io import write_adapter
from lorafit.lora.weighted import combine_adapters

logger = logging.getLogger(__name__)
# Everything `save_pretrained` writes for a tokenizer, beside the files that mark one.
TOKENIZER_EXTRAS = ("special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja",
                    "chat_template.json", "generation_config.json")


def adapter_weights(values: list[float] | None, count: int) -> list[float]:
    """One weight per adapter; by default 1.0 each (the updates added up)."""
    if values is None:
        return [1.0] * count
    if len(values) != count:
        raise UserError(f"--adapter_weights has {len(values)} values for {count} adapters: give one per --adapter")
    return values


def copy_tokenizer(source: Path, target: Path) -> bool:
    copied = False
    for name in TOKENIZER_FILES + TOKENIZER_EXTRAS:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied = True
    return copied


def combine_into(folder: Path, adapters: list[Path], weights: list[float], combination: str) -> Path:
    """Write the combined adapter (and the first tokenizer found among the adapters) into `folder`."""
    config, tensors = combine_adapters(adapters, weights, combination)
    write_adapter(folder, config, tensors)
    for adapter in adapters:
        if copy_tokenizer(adapter, folder):
            logger.info("the combined adapter carries %s's tokenizer and chat template", adapter)
            break
    return folder


def write_combined(output: Path, adapters: list[Path], weights: list[float], combination: str,
                   overwrite: bool = False) -> Path:
    """The combined adapter as the folder `output`, complete or not at all."""
    check_output_folder(output, overwrite)
    if any(output.exists() and output.resolve() == a.resolve() for a in adapters):
        raise UserError(f"--output_dir {output} is one of the adapters being combined; choose another folder")
    with staged_folder(output) as staging:
        combine_into(staging, adapters, weights, combination)
    return output
