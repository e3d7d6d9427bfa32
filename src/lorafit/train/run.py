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
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import lorafit
from lorafit.errors import UserError
from lorafit.train.args import TrainConfig, parse_train_args
from lorafit.train.config_file import write_config_yaml

logger = logging.getLogger("lorafit.train")

# What a run leaves once it has trained (lorafit_config.yaml alone is a run that stopped before
# training, e.g. on bad records: rerunning into its folder is allowed).
RUN_MARKERS = ("adapter_config.json", "config.json", "metrics.jsonl")


def checkpoints_in(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if
                  p.name.split("-")[-1].isdigit() else -1)


def resolve_resume(config: TrainConfig) -> str | None:
    """`--resume_from_checkpoint auto` -> the newest checkpoint of output_dir (or a fresh start)."""
    requested = config.training.resume_from_checkpoint
    if requested in (None, "", "false", "False"):
        return None
    output_dir = Path(config.training.output_dir)
    if requested in ("auto", "true", "True", "latest"):
        found = [p for p in checkpoints_in(output_dir) if (p / "trainer_state.json").is_file()]
        if not found:
            logger.warning("--resume_from_checkpoint auto: no checkpoint in %s, starting from scratch", output_dir)
            return None
        return str(found[-1])
    path = Path(requested)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {requested}: not a checkpoint folder (no trainer_state.json)")
    return str(path)


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
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=level, stream=sys.stdout)
    logging.getLogger("lorafit").setLevel(level)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_warning()  # the Trainer's info lines repeat ours
    datasets.utils.logging.set_verbosity_warning()


def prepare_tokenizer(config: TrainConfig, model_path: str):
    from lorafit.data.templates import set_chat_template
    from lorafit.models import load_tokenizer

    tokenizer = load_tokenizer(config.model.tokenizer_name_or_path or model_path,
                               trust_remote_code=config.model.trust_remote_code)
    return set_chat_template(tokenizer, config.data.template_choice)


def build_trainer(config: TrainConfig, model, tokenizer, prepared, model_path: str):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from lorafit.data.collate import build_collator
    from lorafit.train.callbacks import MetricsReportCallback, ReadableLogPrinter, ReadableProgressCallback
    from lorafit.train.trainer import LorafitTrainer

    trainer = LorafitTrainer(
        model=model, args=config.training, train_dataset=prepared.train, eval_dataset=prepared.eval,
        data_collator=build_collator(config.data, tokenizer), processing_class=tokenizer,
        callbacks=[MetricsReportCallback(config.training.output_dir, title=f"{config.model.model_name_or_path}")],
        base_model_name_or_path=model_path,
    )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ReadableProgressCallback())
    if trainer.pop_callback(PrinterCallback) is not None:  # --disable_tqdm
        trainer.add_callback(ReadableLogPrinter())
    return trainer


def evaluated_at_last_step(state) -> bool:
    return any("eval_loss" in entry and entry.get("step") == state.global_step for entry in state.log_history)


def describe_trainable(model) -> str:
    trainable, total = lorafit.trainable_parameters(model)
    return f"trainable parameters: {trainable:,d} of {total:,d} ({100 * trainable / max(total, 1):.3f}%)"


def main(argv: list[str] | None = None) -> int:
    config = parse_train_args(argv)
    training = config.training
    setup_logging(training)
    resume = resolve_resume(config)
    check_output_dir(config, resume, training.should_save)

    from transformers import set_seed

    from lorafit.data.pipeline import build_datasets
    from lorafit.models import resolve_model_path
    from lorafit.train.callbacks import LOSS_PLOT_FILE, METRICS_FILE, plot_loss, read_metrics
    from lorafit.train.model_setup import build_model
    from lorafit.train.report import CONFIG_FILE, write_model_card

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
    with training.main_process_first(desc="tokenizing"):
        # Only the main process writes files (rejected.jsonl among them).
        prepared = build_datasets(config.data, tokenizer, str(output_dir) if training.should_save else None,
                                  seed=training.seed)
    if training.should_log:
        print(prepared.summary.format(), flush=True)
    if training.eval_strategy != "no" and prepared.eval is None:
        raise UserError("evaluation was requested but there is no evaluation data "
                        "(--validation_file FILE or --validation_split_percentage N)")

    model = build_model(model_path, config.model, config.lora, training)
    logger.info("%s", describe_trainable(model))
    trainer = build_trainer(config, model, tokenizer, prepared, model_path)
    result = trainer.train(resume_from_checkpoint=resume)
    if prepared.eval is not None and not evaluated_at_last_step(trainer.state):
        trainer.evaluate()

    trainer.save_model(str(output_dir))  # adapter (or full model) + tokenizer, rank 0 only
    if training.should_save:
        plot_loss(read_metrics(output_dir / METRICS_FILE), output_dir / LOSS_PLOT_FILE,
                  title=config.model.model_name_or_path)  # again: the final evaluation came after training
        write_model_card(config, output_dir, model_path, data_summary=prepared.summary.format())
        print(f"\ntrained in {result.metrics.get('train_runtime', 0):.1f}s; wrote {output_dir}/ "
              f"(adapter, tokenizer, {CONFIG_FILE}, metrics.jsonl, loss.png, README.md)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
