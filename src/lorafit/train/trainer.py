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
* checkpoints are written into `<output_dir>/.incomplete/` and renamed into place when whole
  (`lorafit.train.checkpoints`), so a killed run never leaves a half-written `checkpoint-N`.
* a step whose loss or gradient norm is not finite changes no weight (its update is skipped); after
  `--max_nonfinite_steps` such steps in a row training stops, and `nonfinite_stop` says why.
* LoRA+ (`--loraplus_lr_ratio`): the optimizer the Trainer would build, with the B matrices in
  parameter groups of their own (`loraplus_parameter_groups`).
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
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lorafit.errors import UserError
from lorafit.lora import save_adapter
from lorafit.lora import lora_layers
from lorafit.lora.adapter_io import PREFIX, WEIGHTS_NAME, adapter_state_dict, read_tensors_for
from lorafit.lora.init import to_original_base
from lorafit.train.checkpoints import (TRAINER_STATE, fresh_staging_folder, publish_folder, rotate_checkpoints,
                                      staging_root, storage_errors)

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
        if ".lora_A." in key or ".lora_B." in key or key.endswith((".lora_magnitude_vector", ".lora_embedding_A",
                                                                   ".lora_embedding_B")):
            tensors[PREFIX + key] = tensor
        elif ".modules_to_save.default." in key:
            tensors[PREFIX + key.replace(".modules_to_save.default.", ".")] = tensor  # PEFT's file name
    return tensors


def load_adapter_weights(model, path: str | Path) -> None:
    """Copy the adapter tensors saved in `path` into the LoRA layers `model` already has."""
    live = adapter_state_dict(model)
    saved = read_tensors_for(model, path)  # a PiSSA/OLoRA checkpoint back to the trained halves
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


def loraplus_parameter_groups(model, lr: float, ratio: float, lr_embedding: float, weight_decay: float,
                              decay_names: set[str]) -> list[dict]:
    """LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models").

    With A and B at one learning rate, the update B A learns features inefficiently at large width:
    B's gradient is scaled by A's output, and the paper shows B should move `ratio` times faster
    (ratio ~16; up to 2x faster convergence and +1-2% on its tasks at the same cost). PEFT's
    grouping (`peft.optimizers.create_loraplus_optimizer`): B matrices and every 1-D parameter
    (DoRA magnitudes) at lr * ratio, embedding LoRA at its own small rate, the rest (A, modules
    trained in full) at lr; the Trainer's weight decay split is kept.
    """
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "embedding" if "lora_embedding_" in name else "B" if "lora_B" in name or param.ndim == 1 else "A"
        groups.setdefault((kind, name in decay_names), []).append(param)
    rates = {"A": lr, "B": lr * ratio, "embedding": lr_embedding}
    return [{"params": params, "lr": rates[kind], "weight_decay": weight_decay if decay else 0.0, "loraplus": kind}
            for (kind, decay), params in sorted(groups.items())]


class LorafitTrainer(Trainer):
    def __init__(self, *args, base_model_name_or_path: str | None = None, loraplus_lr_ratio: float | None = None,
                 loraplus_lr_embedding: float = 1e-6, train_sampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_sampler = train_sampler  # replaces the Trainer's shuffling sampler (replay rotation)
        self.base_model_name_or_path = base_model_name_or_path
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_lr_embedding = loraplus_lr_embedding
        self._trained_tokens: int | None = None  # cumulative, restored from the log history on resume
        self._last_log: tuple[float, int] | None = None  # (time, input tokens) at the previous training log
        self._staging_dir: str | None = None  # set while a checkpoint is being written
        self._step_loss_finite = True
        self._update_skipped = False
        self.nonfinite_streak: list[int] = []  # the steps of the current run of non-finite steps
        self.nonfinite_stop: str | None = None  # why training stopped early on non-finite steps

    def _get_train_sampler(self, train_dataset=None):
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)

    # --- LoRA+ -------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        from transformers.trainer import is_optimizer_factory

        if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            raise UserError(f"--loraplus_lr_ratio cannot be combined with --optim {self.args.optim}, "
                            "which chooses its own parameter groups")
        groups = loraplus_parameter_groups(opt_model, self.args.learning_rate, self.loraplus_lr_ratio,
                                           self.loraplus_lr_embedding, self.args.weight_decay,
                                           set(self.get_decay_parameter_names(opt_model)))
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # --- adapter-only saving and loading -------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not is_native_lora(self.model):
            return super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        save_adapter(self.model, output_dir, base_model_name_or_path=self.base_model_name_or_path)
        if state_dict is not None:  # sharded training: the live parameters are shards, use the gathered copy
            tensors = to_original_base(adapter_tensors_from_state_dict(state_dict), dict(lora_layers(self.model)),
                                       PREFIX)
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

    # --- crash-safe checkpoints ------------------------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial=trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint, written into `<run>/.incomplete/checkpoint-N/` (the stock code asks
        `_get_output_dir` where to write) and renamed into place once every process wrote its part."""
        run_dir = Path(super()._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = staging_root(run_dir) / name
        with storage_errors(run_dir / name):
            if self.args.should_save:
                fresh_staging_folder(run_dir, name)
            self.accelerator.wait_for_everyone()
            self._staging_dir = str(staged.parent)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_dir = None
            self.accelerator.wait_for_everyone()  # RNG states and optimizer shards come from every process
            if self.args.should_save:
                best = self.state.best_model_checkpoint
                if best is not None and Path(best).parent == staged.parent:  # the stock code saw the staged path
                    self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                    self.state.save_to_json(str(staged / TRAINER_STATE))
                publish_folder(staged, run_dir / name)
                rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    # --- non-finite steps ------------------------------------------------------------------------

    @property
    def max_nonfinite_steps(self) -> int:
        return getattr(self.args, "max_nonfinite_steps", 3)  # plain TrainingArguments lack the flag

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # A host sync per micro-batch, as the Trainer's own logging_nan_inf_filter check already makes.
        self._step_loss_finite = self._step_loss_finite and bool(torch.isfinite(loss).all())
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Called between the last backward of a step and the optimizer step: the place to drop a
        non-finite update. With no gradients, AdamW leaves every weight and moment as it was."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        norm = grad_norm.item() if torch.is_tensor(grad_norm) else grad_norm
        loss_ok, norm_ok = self._step_loss_finite, norm is None or math.isfinite(norm)
        self._step_loss_finite = True
        bad = not (loss_ok and norm_ok)
        if self.args.world_size > 1:  # every process must take the same decision
            flag = torch.tensor([float(bad)], device=self.args.device)
            bad = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        self._update_skipped = bad
        if not bad:
            self.nonfinite_streak = []
            return grad_norm
        model.zero_grad(set_to_none=True)
        step = self.state.global_step + 1
        self.nonfinite_streak.append(step)
        what = "loss" if not loss_ok else "gradient norm" if not norm_ok else "loss or gradient norm (another process)"
        logger.warning("step %d: the %s is not finite; update skipped (%d in a row; the run stops at "
                       "--max_nonfinite_steps %d)", step, what, len(self.nonfinite_streak), self.max_nonfinite_steps)
        return grad_norm

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        if self._update_skipped:
            # Every checkpoint on disk was taken right after a good update, so saving
            # save_total_limit checkpoints during a fault never rotates the last good one away.
            self.control.should_save = False
            if len(self.nonfinite_streak) >= self.max_nonfinite_steps:
                first, last = self.nonfinite_streak[0], self.nonfinite_streak[-1]
                self.nonfinite_stop = (f"the loss or gradient norm was not finite at {len(self.nonfinite_streak)} "
                                       f"steps in a row (steps {first}-{last}; --max_nonfinite_steps "
                                       f"{self.max_nonfinite_steps})")
                self.control.should_training_stop = True
        super()._maybe_log_save_evaluate(*args, **kwargs)

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
