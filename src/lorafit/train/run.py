"""`lorafit train`: the run_clm LoRA recipe, from arguments to a saved adapter and its reports.

    lorafit train [config.yaml] --train_file data.jsonl [--flag value ...]

Steps, in order: parse and check the arguments, load the tokenizer and install the chat template,
tokenize the data (rank 0 first, the others reuse its cache), load the base model and attach the
adapter, train with `LorafitTrainer`, then write into `--output_dir`:

    adapter_model.safetensors, adapter_config.json   the adapter, PEFT layout (or a full model)
    tokenizer files                                  with the chat template used in training
    lorafit_config.yaml                              the resolved arguments; `lorafit train` reruns it
    metrics.jsonl, loss.png                          every log line, and the loss curves
    README.md                                        the model card
    checkpoint-N/                                    adapter + optimizer, scheduler, RNG, data position

Multi-process runs (torchrun, accelerate launch) go through the Trainer's own data parallelism;
only the world's rank 0 writes files.

A run that does not reach its last step says so and how to go on: SIGINT/SIGTERM save a checkpoint
at the end of the current step (`graceful_stop`), repeated non-finite steps stop at the last good
checkpoint (`LorafitTrainer`); both raise `TrainingStopped`, whose message is the resume command.
Checkpoints and the final adapter are renamed into place when whole (`checkpoints`).
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
from pathlib import Path

import lorafit
from lorafit.errors import TrainingStopped, UserError
from lorafit.train.args import TrainConfig, parse_train_args
from lorafit.train.checkpoints import checkpoint_problems, fresh_staging_folder, publish_files, storage_errors
from lorafit.train.config_file import write_config_yaml

logger = logging.getLogger("lorafit.train")

# What a run leaves once it has trained (lorafit_config.yaml alone is a run that stopped before
# training, e.g. on bad records: rerunning into its folder is allowed).
RUN_MARKERS = ("adapter_config.json", "config.json", "metrics.jsonl")


def checkpoints_in(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if
                  p.name.split("-")[-1].isdigit() else -1)


def _expects_optimizer(training) -> bool:
    return not training.save_only_model and not training.deepspeed  # DeepSpeed keeps its own layout


def resolve_resume(config: TrainConfig) -> str | None:
    """`--resume_from_checkpoint auto` -> the newest whole checkpoint of output_dir (or a fresh start);
    a checkpoint with a file missing or unreadable is skipped with a warning."""
    requested = config.training.resume_from_checkpoint
    if requested in (None, "", "false", "False"):
        return None
    output_dir = Path(config.training.output_dir)
    expect_optimizer = _expects_optimizer(config.training)
    if requested in ("auto", "true", "True", "latest"):
        for checkpoint in reversed(checkpoints_in(output_dir)):
            problems = checkpoint_problems(checkpoint, expect_optimizer)
            if not problems:
                return str(checkpoint)
            logger.warning("--resume_from_checkpoint auto: skipping %s (%s)", checkpoint, "; ".join(problems))
        logger.warning("--resume_from_checkpoint auto: no complete checkpoint in %s, starting from scratch",
                       output_dir)
        return None
    path = Path(requested)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {requested}: not a checkpoint folder (no trainer_state.json)")
    problems = checkpoint_problems(path, expect_optimizer)
    if problems:
        raise UserError(f"--resume_from_checkpoint {requested}: incomplete checkpoint ({'; '.join(problems)}); "
                        "pass an earlier one, or auto to pick the newest complete one")
    return str(path)


def resume_command(argv: list[str], checkpoint: Path | None) -> str:
    """The command line that continues this run: the same arguments, resuming from `checkpoint`."""
    kept, skip_value = [], False
    for token in argv:
        if skip_value:
            skip_value = False
        elif token == "--resume_from_checkpoint":
            skip_value = True
        elif not token.startswith("--resume_from_checkpoint="):
            kept.append(token)
    return shlex.join(["lorafit", "train", *kept, "--resume_from_checkpoint",
                       str(checkpoint) if checkpoint is not None else "auto"])


def latest_checkpoint(output_dir: Path, training) -> Path | None:
    complete = [p for p in checkpoints_in(output_dir) if not checkpoint_problems(p, _expects_optimizer(training))]
    return complete[-1] if complete else None


def stopped_early(trainer, stop, argv: list[str], output_dir: Path) -> TrainingStopped | None:
    """The TrainingStopped to raise when training ended before its last step, else None."""
    from lorafit.train.graceful_stop import exit_code, signal_name

    state = trainer.state
    if stop.received is None and trainer.nonfinite_stop is None:
        return None
    if stop.received is not None and state.global_step >= state.max_steps:
        return None  # the signal came after the last step: the run is complete, finish writing it
    checkpoint = latest_checkpoint(output_dir, trainer.args)
    where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (none was complete)"
    resume = f"; resume with: {resume_command(argv, checkpoint)}" if checkpoint else ""
    if trainer.nonfinite_stop is not None:
        return TrainingStopped(f"stopped at step {state.global_step}/{state.max_steps}: {trainer.nonfinite_stop}. "
                               f"The last good state is {where}. Lower --learning_rate or check the data "
                               f"before resuming{resume}", exit_code=1)
    return TrainingStopped(f"stopped by {signal_name(stop.received)} after step {state.global_step}/"
                           f"{state.max_steps}; saved {where}{resume}", exit_code=exit_code(stop.received))


def check_output_dir(config: TrainConfig, resume: str | None, is_main: bool) -> None:
    """Refuse to mix two runs in one folder unless asked; with --overwrite_output_dir, drop the old
    run's checkpoints so `auto` resume and save_total_limit see only this run's."""
    output_dir = Path(config.training.output_dir)
    if resume is not None or not output_dir.is_dir():
        return
    previous = [p.name for p in output_dir.iterdir() if p.name in RUN_MARKERS]
    previous += [p.name for p in checkpoints_in(output_dir)]
    if not previous:
        return
    if not config.training.overwrite_output_dir:
        resumable = "--resume_from_checkpoint auto to continue it, " if checkpoints_in(output_dir) else ""
        raise UserError(
            f"--output_dir {output_dir} already holds a run ({', '.join(sorted(previous)[:4])}); pass "
            f"{resumable}--overwrite_output_dir to replace it, or another --output_dir"
        )
    if is_main:
        for checkpoint in checkpoints_in(output_dir):
            shutil.rmtree(checkpoint)


def setup_logging(training_args) -> None:
    from lorafit.train.callbacks import output_is_terminal

    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=level, stream=sys.stdout)
    logging.getLogger("lorafit").setLevel(level)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_warning()  # the Trainer's info lines repeat ours
    datasets.utils.logging.set_verbosity_warning()
    if not output_is_terminal():
        # A log file cannot hold a redrawn bar: its carriage returns and cursor moves become noise.
        # Training reports one plain line per log instead (callbacks.ReadableLogPrinter).
        import huggingface_hub

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def prepare_tokenizer(config: TrainConfig, model_path: str):
    from lorafit.data.templates import set_chat_template
    from lorafit.models import load_tokenizer

    tokenizer = load_tokenizer(config.model.tokenizer_name_or_path or model_path,
                               trust_remote_code=config.model.trust_remote_code)
    return set_chat_template(tokenizer, config.data.template_choice)


def build_trainer(config: TrainConfig, model, tokenizer, prepared, model_path: str, eval_prompts=None,
                  train_sampler=None):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from lorafit.data.collate import build_collator
    from lorafit.train.callbacks import (MetricsReportCallback, ReadableLogPrinter, ReadableProgressCallback,
                                         output_is_terminal)
    from lorafit.train.graceful_stop import GracefulStopCallback
    from lorafit.train.trainer import LorafitTrainer

    trainer = LorafitTrainer(
        model=model, args=config.training, train_dataset=prepared.train, eval_dataset=prepared.eval,
        data_collator=build_collator(config.data, tokenizer), processing_class=tokenizer,
        callbacks=[MetricsReportCallback(config.training.output_dir, title=f"{config.model.model_name_or_path}"),
                   GracefulStopCallback()],
        # A folder is written as an absolute path: a relative one would resolve against wherever
        # the adapter is loaded from later, and could pick another model.
        base_model_name_or_path=str(Path(model_path).resolve()) if Path(model_path).is_dir() else model_path,
        loraplus_lr_ratio=config.lora.loraplus_lr_ratio, loraplus_lr_embedding=config.lora.loraplus_lr_embedding,
        train_sampler=train_sampler,
    )
    if trainer.pop_callback(ProgressCallback) is not None:  # tqdm bars on a terminal, plain lines elsewhere
        trainer.add_callback(ReadableProgressCallback() if output_is_terminal() else ReadableLogPrinter())
    if trainer.pop_callback(PrinterCallback) is not None:  # --disable_tqdm
        trainer.add_callback(ReadableLogPrinter())
    if train_sampler is not None:
        from lorafit.train.replay_rotation import ReplayRotationCallback

        trainer.add_callback(ReplayRotationCallback(train_sampler))
    if eval_prompts:
        from lorafit.train.eval_prompts import EvalPromptsCallback

        trainer.add_callback(EvalPromptsCallback(eval_prompts, tokenizer, config.training.output_dir,
                                                 config.training.eval_prompts_max_new_tokens))
    return trainer


def graceful_stop_of(trainer):
    from lorafit.train.graceful_stop import GracefulStopCallback

    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GracefulStopCallback))


def save_final_outputs(trainer, output_dir: Path) -> None:
    """The adapter (or full model) and tokenizer, written into staging and moved into place."""
    from lorafit.train.checkpoints import STAGING_DIR

    staged = output_dir / STAGING_DIR / "final"
    with storage_errors(output_dir):
        if trainer.args.should_save:
            fresh_staging_folder(output_dir, "final")
        trainer.save_model(str(staged))  # every process takes part (sharded models gather); rank 0 writes
        if trainer.args.should_save:
            publish_files(staged, output_dir)


def evaluated_at_last_step(state) -> bool:
    return any("eval_loss" in entry and entry.get("step") == state.global_step for entry in state.log_history)


def add_replay_file(config: TrainConfig, model_path: str, tokenizer) -> None:
    """Append the base model's answers to the replay prompts to the training files (`train.replay`)."""
    from lorafit.data.templates import set_chat_template
    from lorafit.train.replay import replay_file

    training = config.training
    set_chat_template(tokenizer, config.data.template_choice)  # answers rendered as training renders
    path = replay_file(model_path, tokenizer, training.replay_prompts, training.replay_samples,
                       training.replay_max_new_tokens, training.seed, config.model.trust_remote_code)
    config.data.train_file = [*config.data.train_file, str(path)]


def distills_replay(config: TrainConfig) -> bool:
    training = config.training
    return bool(training.replay_prompts and config.data.train_file and training.replay_distill_top_k)


def add_replay_targets(config: TrainConfig, model, model_path: str, prepared, tokenizer) -> None:
    """The base model's top-k distributions as the replay rows' targets (`lorafit.train.replay_targets`),
    computed before the first step, while the adapted model still equals the base; and the task data's
    signature tokens (`lorafit.train.replay_token_penalty`) held down at them with
    --replay_token_penalty, and weighted at the task rows with --signature_token_weight."""
    from lorafit.train.replay_targets import add_soft_targets
    from lorafit.train.replay_token_penalty import task_signature_tokens, token_penalty
    from lorafit.train.trained_token_loss import uses_trained_token_loss

    training = config.training
    if config.data.streaming:
        raise UserError("--replay_distill_top_k needs the whole data set up front; it does not work with --streaming")
    if not uses_trained_token_loss(model):
        raise UserError("--replay_distill_top_k needs lorafit's trained-token loss, which this run does not use "
                        "(a model whose head it cannot compute, --trained_token_loss false, --lora_impl peft or "
                        "--use_liger_kernel); leave it at 0")
    replay_path = config.data.train_file[-1]  # add_replay_file put it last
    tokens = []
    if training.replay_token_penalty > 0 or training.signature_token_weight != 1.0:
        tokens = task_signature_tokens(prepared.train, replay_path, tokenizer)
    emphasis = (tokens, training.signature_token_weight) if tokens and training.signature_token_weight != 1.0 else None
    with training.main_process_first(desc="replay targets"):  # one process computes and caches them
        prepared.train = add_soft_targets(prepared.train, model, model_path, replay_path,
                                          training.replay_distill_top_k, training.replay_weight, emphasis)
    if tokens and training.replay_token_penalty > 0:
        model._lorafit_token_penalty = token_penalty(tokens, training.replay_token_penalty)


def rotates_replay(config: TrainConfig) -> bool:
    training = config.training
    return bool(training.replay_rotation and training.replay_prompts and config.data.train_file)


def keeps_source(config: TrainConfig) -> bool:
    """Whether the prepared rows keep their "source" column: replay distillation and rotation need to
    know which rows are replay answers (dropped by `drop_source` once they do)."""
    return distills_replay(config) or rotates_replay(config)


def drop_source(prepared) -> None:
    prepared.train = prepared.train.remove_columns("source")
    if prepared.eval is not None and "source" in prepared.eval.column_names:
        prepared.eval = prepared.eval.remove_columns("source")


def describe_trainable(model) -> str:
    trainable, total = lorafit.trainable_parameters(model)
    return f"trainable parameters: {trainable:,d} of {total:,d} ({100 * trainable / max(total, 1):.3f}%)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_train_args(argv)
    training = config.training
    if training.max_nonfinite_steps < 1:
        raise UserError(f"--max_nonfinite_steps must be at least 1, got {training.max_nonfinite_steps}")
    setup_logging(training)
    resume = resolve_resume(config)
    check_output_dir(config, resume, training.should_save)

    from transformers import set_seed

    from lorafit.data.pipeline import build_datasets
    from lorafit.lora.rescale import scale_update
    from lorafit.models import resolve_model_path
    from lorafit.train.callbacks import LOSS_PLOT_FILE, METRICS_FILE, plot_loss, read_metrics
    from lorafit.train.frozen_prefix import enable_frozen_prefix_cache
    from lorafit.train.model_setup import build_model
    from lorafit.train.trained_token_loss import uses_trained_token_loss
    from lorafit.train.report import CONFIG_FILE, write_model_card

    eval_prompts = None
    if training.eval_prompts:  # read (and refused, if bad) before anything heavy starts
        from lorafit.evaluate.prompts import read_eval_prompts

        eval_prompts = read_eval_prompts(training.eval_prompts, flag="--eval_prompts")
    if rotates_replay(config):
        from lorafit.train.replay_rotation import check_rotation_settings

        check_rotation_settings(config)
    if config.lora.adapter_scale != 1.0 and (training.deepspeed or training.fsdp):
        raise UserError("--adapter_scale scales the update on each process's whole model; it is not supported "
                        "with --deepspeed or --fsdp sharding")
    set_seed(training.seed)
    output_dir = Path(training.output_dir)
    if training.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        # Written first, so even a run that crashes documents what it was asked to do.
        write_config_yaml(config, output_dir / CONFIG_FILE,
                          header=f"written by lorafit {lorafit.__version__}; rerun: lorafit train {CONFIG_FILE}")
    with training.main_process_first(desc="model resolution"):
        model_path = resolve_model_path(config.model.model_name_or_path)
    tokenizer = prepare_tokenizer(config, model_path)
    if training.replay_prompts and config.data.train_file:
        with training.main_process_first(desc="replay answers"):
            add_replay_file(config, model_path, tokenizer)
    with training.main_process_first(desc="tokenizing"):
        # Only the main process writes files (rejected.jsonl among them).
        prepared = build_datasets(config.data, tokenizer, str(output_dir) if training.should_save else None,
                                  seed=training.seed, keep_source=keeps_source(config))
    if training.should_log:
        print(prepared.summary.format(), flush=True)
    if training.eval_strategy != "no" and prepared.eval is None:
        raise UserError("evaluation was requested but there is no evaluation data "
                        "(--validation_file FILE or --validation_split_percentage N)")
    if eval_prompts and training.eval_strategy == "no":
        raise UserError("--eval_prompts are answered at each evaluation: also pass --eval_strategy epoch (or steps) "
                        "and evaluation data (--validation_file FILE or --validation_split_percentage N)")

    model = build_model(model_path, config.model, config.lora, training)
    logger.info("%s", describe_trainable(model))
    if distills_replay(config):
        add_replay_targets(config, model, model_path, prepared, tokenizer)
    rotation = None
    if rotates_replay(config):
        from lorafit.train.replay_rotation import rotation_sampler

        rotation = rotation_sampler(config, prepared.train)
    if keeps_source(config):
        drop_source(prepared)
    if training.frozen_prefix_cache_gb > 0 and not config.data.streaming and uses_trained_token_loss(model):
        enable_frozen_prefix_cache(model, training, prepared.summary.tokens)
    trainer = build_trainer(config, model, tokenizer, prepared, model_path, eval_prompts, rotation)
    stop = graceful_stop_of(trainer)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stop.restore_handlers()
    prefix_cache = getattr(model, "_lorafit_prefix_cache", None)
    if prefix_cache is not None:
        logger.info("frozen-prefix cache: %d of %d batches started at block %d, %d more after the frozen "
                    "blocks ran for their new examples only", prefix_cache.hits,
                    prefix_cache.hits + prefix_cache.partial_hits + prefix_cache.misses, prefix_cache.first,
                    prefix_cache.partial_hits)
    stopped = stopped_early(trainer, stop, argv, output_dir)
    if stopped is not None:
        if not training.should_log:
            return stopped.exit_code  # one process tells the user
        raise stopped
    scaled = config.lora.adapter_scale != 1.0
    if scaled:
        moved = scale_update(model, config.lora.adapter_scale)
        logger.info("adapter update scaled by %g in %d modules (--adapter_scale)", config.lora.adapter_scale, moved)
    if prepared.eval is not None and (scaled or not evaluated_at_last_step(trainer.state)):
        trainer.evaluate()  # the figures of the adapter as saved

    save_final_outputs(trainer, output_dir)
    if training.should_save:
        plot_loss(read_metrics(output_dir / METRICS_FILE), output_dir / LOSS_PLOT_FILE,
                  title=config.model.model_name_or_path)  # again: the final evaluation came after training
        write_model_card(config, output_dir, model_path, data_summary=prepared.summary.format())
        print(f"\ntrained in {result.metrics.get('train_runtime', 0):.1f}s; wrote {output_dir}/ "
              f"(adapter, tokenizer, {CONFIG_FILE}, metrics.jsonl, loss.png, README.md)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
