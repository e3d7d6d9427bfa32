"""`LorafitTrainer`: the Hugging Face Trainer, with adapter-only checkpoints for lorafit's LoRA.

What the stock Trainer already does right, and we rely on:
* the loss is a mean over the *trained tokens of the whole optimizer step*: it counts the labels
  that are not -100 across every micro-batch of the step (and across processes), passes that
  count to the model's loss as `num_items_in_batch`, and then does not divide by the number of
  accumulation steps again. A micro-batch mean would give the tokens of short examples more
  weight than those of long ones. (This needs a model whose forward takes `**kwargs`, as every
  transformers causal LM does; our LoRA layers wrap modules in place, so the forward is unchanged.)
* optimizer, scheduler, RNG and data position (`trainer_state.json`) are checkpointed and restored.

What we change:
* a model with lorafit LoRA layers is saved as an adapter (PEFT layout) plus tokenizer, never as a
  full model: checkpoints stay a few MB and hold no frozen base weight. Loading a checkpoint for
  resume or `load_best_model_at_end` copies the adapter tensors back into the live layers.
* the logs gain `tokens_per_second` (input tokens, all processes), `trained_tokens` (cumulative
  label tokens) and `eval_perplexity`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer

from lorafit.errors import UserError
from lorafit.lora import save_adapter
from lorafit.lora.adapter_io import PREFIX, WEIGHTS_NAME, adapter_state_dict, read_adapter_tensors

logger = logging.getLogger(__name__)


def is_native_lora(model) -> bool:
    return getattr(model, "lora_config", None) is not None


def adapter_tensors_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT-layout adapter tensors from a full (gathered) state dict of a native-LoRA model.

    FSDP and DeepSpeed ZeRO-3 hand `_save` a gathered state dict because the live parameters are
    shards; this picks the adapter's entries out of it under the names `save_adapter` writes.
    """
    tensors = {}
    for key, tensor in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key:
            tensors[PREFIX + key] = tensor
        elif ".modules_to_save.default." in key:
            tensors[PREFIX + key.replace(".modules_to_save.default.", ".")] = tensor  # PEFT's file name
    return tensors


def load_adapter_weights(model, path: str | Path) -> None:
    """Copy the adapter tensors saved in `path` into the LoRA layers `model` already has."""
    live = adapter_state_dict(model)
    saved = read_adapter_tensors(Path(path))
    missing, unexpected = live.keys() - saved.keys(), saved.keys() - live.keys()
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not match this run's adapter: {len(missing)} tensors missing "
            f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]}); "
            "were the LoRA arguments changed since the checkpoint was written?"
        )
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(saved[key].to(tensor.dtype))


class LorafitTrainer(Trainer):
    def __init__(self, *args, base_model_name_or_path: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.base_model_name_or_path = base_model_name_or_path
        self._trained_tokens: int | None = None  # cumulative, restored from the log history on resume
        self._last_log: tuple[float, int] | None = None  # (time, input tokens) at the previous training log

    # --- adapter-only saving and loading -------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not is_native_lora(self.model):
            return super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        save_adapter(self.model, output_dir, base_model_name_or_path=self.base_model_name_or_path)
        if state_dict is not None:  # sharded training: the live parameters are shards, use the gathered copy
            tensors = adapter_tensors_from_state_dict(state_dict)
            tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
            save_file(tensors, os.path.join(output_dir, WEIGHTS_NAME), metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not is_native_lora(self.model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        logger.info("loading the adapter of checkpoint %s", resume_from_checkpoint)
        load_adapter_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not is_native_lora(self.model):
            return super()._load_best_model()
        logger.info("loading the best adapter from %s (score %s)", self.state.best_model_checkpoint,
                    self.state.best_metric)
        load_adapter_weights(self.model, self.state.best_model_checkpoint)

    # --- token counts and richer logs ----------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._trained_tokens is None:  # first step of this run: the state is loaded by now
            self._trained_tokens = self._trained_tokens_from_history()
            self._last_log = (time.perf_counter(), self.state.num_input_tokens_seen)
        if num_items_in_batch is not None:
            count = int(num_items_in_batch.sum().item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
            if self.args.world_size > 1 and not self.args.average_tokens_across_devices:
                count *= self.args.world_size  # the Trainer counted this process's share only
            self._trained_tokens += count
        return batch_samples, num_items_in_batch

    def _trained_tokens_from_history(self) -> int:
        for entry in reversed(self.state.log_history):
            if "trained_tokens" in entry:
                return int(entry["trained_tokens"])
        return 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now, seen = time.perf_counter(), self.state.num_input_tokens_seen
            if self._last_log is not None and now > self._last_log[0]:
                logs["tokens_per_second"] = round((seen - self._last_log[1]) / (now - self._last_log[0]), 1)
            self._last_log = (now, seen)
            if self._trained_tokens is not None:
                logs["trained_tokens"] = self._trained_tokens
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))  # exp(50) already means "diverged"
        super().log(logs, start_time)
