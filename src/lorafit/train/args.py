"""`lorafit train` arguments: four dataclasses parsed by `transformers.HfArgumentParser`.

Users of the `run_clm` LoRA recipe know these flags already: model arguments, the data arguments
of `lorafit.data.args`, LoRA arguments, and every `TrainingArguments` flag. Three things are ours:

* a YAML (or JSON) file may come first, `lorafit train run.yaml --learning_rate 1e-4`; precedence
  is lorafit's defaults < the file < flags;
* an unknown or misspelled name, on the command line or in the file, is an error naming the
  closest valid one (argparse's prefix matching is off, so `--learning_rat` is not silently taken);
* defaults suited to LoRA where the user gives none (`LorafitTrainingArguments` below): the
  Trainer's defaults (lr 5e-5, linear schedule, a log every 500 steps) are tuned for full
  fine-tuning of large data and would show nothing at all on a small data set.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

import yaml
from transformers import HfArgumentParser, TrainingArguments

from lorafit.data.args import DataArguments
from lorafit.errors import UserError
from lorafit.models import EMBEDDED_MODEL

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
DTYPE_CHOICES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
# Names other recipes use for the same thing; the right-hand side is the flag that takes the value.
RENAMED = {
    "warmup_ratio": "warmup_steps",          # transformers 5 folded it into warmup_steps < 1
    "evaluation_strategy": "eval_strategy",  # transformers < 4.46 spelling
    "trainable": "target_modules",           # Chinese-LLaMA-Alpaca's run_clm_sft_with_peft
    "lora_trainable": "target_modules",
    "lora_target": "target_modules",         # LLaMA-Factory
    "lora_r": "lora_rank",
    "max_seq_length": "cutoff_len",
    "dtype": "torch_dtype",
    "gradient_checkpointing": "activation_checkpointing",  # transformers 5's name; the old one warns
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
    "quantization_type": "quant_type",       # LLaMA-Factory
    "double_quantization": "double_quant",
    "bnb_4bit_quant_type": "quant_type",     # bitsandbytes / PEFT
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
}
# Boolean flags that transformers 5 turned into a choice: old name -> (new name, value if true, if false).
BOOLEAN_TO_CHOICE = {"group_by_length": ("train_sampling_strategy", "group_by_length", "random")}
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "y", "t", "1"), ("false", "no", "n", "f", "0")


class ArgumentsError(UserError):
    """A bad flag, value or configuration file for `lorafit train`."""


@dataclass
class ModelArguments:
    _argument_group_name = "model arguments"

    model_name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": f"base model: a folder, a Hub id, or '{EMBEDDED_MODEL}' (the embedded model, no download)"},
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "tokenizer folder or id, when it differs from the model's"}
    )
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "dtype of the frozen base weights: auto, float32, bfloat16, float16. Default: "
                          "bfloat16/float16 with --bf16/--fp16 for LoRA (adapters stay float32), float32 otherwise",
                  "choices": DTYPE_CHOICES},
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "attention kernel: eager, sdpa, flash_attention_2 (default: transformers')"}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "run model code shipped with a Hub checkpoint (off: it is arbitrary code)"}
    )
    trained_token_loss: bool = field(
        default=True,
        metadata={"help": "compute the output head and loss at trained positions only, in chunks: the same loss "
                          "without the full [tokens x vocab] logits (faster, far less memory); false: the model's own loss"},
    )
    quantization_bit: Optional[int] = field(
        default=None,
        metadata={"help": "QLoRA: quantize the frozen base to 4 or 8 bits as it loads (bitsandbytes: "
                          "pip install 'lorafit[qlora]'); the adapter stays in float", "choices": [4, 8]},
    )
    quant_type: Optional[str] = field(
        default=None, metadata={"help": "4-bit data type: nf4 (NormalFloat, the default) or fp4"}
    )
    double_quant: Optional[bool] = field(
        default=None, metadata={"help": "4-bit: quantize the block scales too (default: true)"}
    )
    compute_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "dtype a quantized layer computes in (default: bfloat16/float16 with --bf16/--fp16, "
                          "else float32)", "choices": DTYPE_CHOICES},
    )

    def quantization(self, training_args=None):
        """The `QuantizationSpec` these flags ask for, or None (its errors name the flag)."""
        from lorafit.quant import QuantizationSpec

        compute = self.compute_dtype
        if compute is None and training_args is not None:
            compute = "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else None
        return QuantizationSpec.from_flags(self.quantization_bit, self.quant_type, self.double_quant, compute)

    def __post_init__(self):
        self.quantization()  # refuse bad combinations before anything loads


@dataclass
class LoraArguments:
    _argument_group_name = "LoRA arguments"

    use_peft: bool = field(
        default=True, metadata={"help": "train a LoRA adapter; --use_peft false fine-tunes every weight"}
    )
    lora_impl: Literal["native", "peft"] = field(
        default="native",
        metadata={"help": "LoRA implementation: lorafit's own (native) or the peft library (for comparison)"},
    )
    lora_rank: int = field(default=8, metadata={"help": "rank r of the update B A"})
    lora_alpha: float = field(default=32.0, metadata={"help": "scaling numerator: the update is scaled by alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input"})
    target_modules: str = field(
        default="all-linear",
        metadata={"help": "modules to adapt: 'all-linear' (every linear layer but the output head), a comma list "
                          "of name suffixes (q_proj,v_proj), or a regex over full module names"},
    )
    exclude_modules: Optional[str] = field(
        default=None, metadata={"help": "comma list or regex of modules never to adapt"}
    )
    modules_to_save: Optional[str] = field(
        default=None, metadata={"help": "comma list of modules trained in full, e.g. embed_tokens,lm_head"}
    )
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r)"})
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA: also train a magnitude per output feature (docs/lora_variants.md)"}
    )
    init_lora_weights: str = field(
        default="true",
        metadata={"help": "adapter initialisation: true (A random, B zero), false, gaussian, pissa, pissa_niter_<K> "
                          "(fast randomised SVD), olora; pissa/olora adapters are saved for the original base"},
    )
    layers_to_transform: Optional[str] = field(
        default=None,
        metadata={"help": "adapt only these block indices: a comma list and/or ranges, e.g. 15-29 or 0,2,4-7, "
                          "or the top blocks of any model: 'last 10', 'last 33%%' "
                          "(with a list of target_modules or all-linear)"},
    )
    layers_pattern: Optional[str] = field(
        default=None, metadata={"help": "name of the block list the indices refer to (layers, h); default: any"}
    )
    loraplus_lr_ratio: Optional[float] = field(
        default=None,
        metadata={"help": "LoRA+: train the B matrices at learning_rate times this ratio (e.g. 16); "
                          "default: one learning rate for all"},
    )
    loraplus_lr_embedding: float = field(
        default=1e-6, metadata={"help": "LoRA+: learning rate of embedding LoRA (lora_embedding_A/B), as PEFT's"}
    )
    peft_path: Optional[str] = field(
        default=None, metadata={"help": "continue training this adapter folder (lorafit or PEFT layout)"}
    )
    adapter_scale: float = field(
        default=1.0,
        metadata={"help": "multiply the trained update by this factor in the saved adapter (WiSE-FT: 1 is the "
                          "fine-tuned model, 0 the base; below 1 gives back what a narrow fine-tune broke; "
                          "PEFT's rescale_adapter_scale, baked in)"},
    )

    def __post_init__(self):
        if self.lora_rank <= 0:
            raise ArgumentsError(f"--lora_rank must be a positive integer, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ArgumentsError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.init_lora_weights = parse_init_lora_weights(self.init_lora_weights)
        self.layers_to_transform = parse_layer_indices(self.layers_to_transform)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ArgumentsError("--layers_pattern names the block list of --layers_to_transform; "
                                 "give --layers_to_transform too")
        if self.loraplus_lr_ratio is not None:
            if not self.use_peft:
                raise ArgumentsError("--loraplus_lr_ratio sets the learning rate of LoRA's B matrices; "
                                     "it cannot be combined with --use_peft false")
            if not self.loraplus_lr_ratio > 0:
                raise ArgumentsError(f"--loraplus_lr_ratio must be positive (LoRA+ uses 2-32), "
                                     f"got {self.loraplus_lr_ratio}")
        if self.loraplus_lr_embedding < 0:
            raise ArgumentsError(f"--loraplus_lr_embedding must be at least 0, got {self.loraplus_lr_embedding}")
        self._check_adapter_scale()
        if self.peft_path is not None:
            if not self.use_peft:
                raise ArgumentsError("--peft_path continues a LoRA adapter; "
                                     "it cannot be combined with --use_peft false")
            if not (Path(self.peft_path) / "adapter_config.json").is_file():
                raise ArgumentsError(f"--peft_path {self.peft_path}: not an adapter folder (no adapter_config.json)")

    def _check_adapter_scale(self) -> None:
        from lorafit.lora.config import rewrites_base

        if self.adapter_scale == 1.0:
            return
        if not self.adapter_scale > 0:
            raise ArgumentsError(f"--adapter_scale must be positive (0.5-1 to interpolate toward the base), "
                                 f"got {self.adapter_scale}")
        if not self.use_peft or self.lora_impl == "peft":
            raise ArgumentsError("--adapter_scale scales lorafit's own LoRA update; it cannot be combined with "
                                 + ("--use_peft false" if not self.use_peft else "--lora_impl peft"))
        if self.use_dora or rewrites_base(self.init_lora_weights):
            what = "--use_dora" if self.use_dora else f"--init_lora_weights {self.init_lora_weights}"
            raise ArgumentsError(f"--adapter_scale cannot be combined with {what}: scaling that adapter's update "
                                 "does not lead back to the base model")


def parse_init_lora_weights(value) -> bool | str:
    """'true'/'false' (any case) -> bool; the other initialisations stay strings, checked here."""
    from lorafit.lora.config import INIT_CHOICES, valid_init

    if isinstance(value, bool):
        return value
    text = str(value).strip()
    parsed = {"true": True, "false": False}.get(text.lower(), text)
    if not valid_init(parsed):
        choices = ", ".join(str(choice).lower() if isinstance(choice, bool) else choice for choice in INIT_CHOICES)
        raise ArgumentsError(f"--init_lora_weights {value!r}: expected one of {choices} "
                             "(K a number of iterations, e.g. pissa_niter_4)")
    return parsed


@dataclass(frozen=True)
class LastLayers:
    """`--layers_to_transform last 10` or `last 33%`: the top blocks of whatever model is loaded,
    resolved to indices once the model is there (`train/model_setup.py`)."""

    count: int
    percent: bool = False

    def indices(self, blocks: int) -> list[int]:
        count = max(1, round(blocks * self.count / 100)) if self.percent else min(self.count, blocks)
        return list(range(blocks - count, blocks))

    def __str__(self) -> str:
        return f"last {self.count}{'%' if self.percent else ''}"


def parse_layer_indices(value) -> list[int] | LastLayers | None:
    """'15-29' or '0,2,4-7' (or a YAML list / integer) -> sorted indices; 'last 10' or 'last 33%' ->
    LastLayers (the model's top blocks); None stays None."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "none", "None")):
        return None
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str) and value.strip().lower().startswith("last"):
        return _parse_last_layers(value)
    parts = [str(v).strip() for v in value] if isinstance(value, list) else str(value).split(",")
    indices = set()
    for part in (p.strip() for p in parts if p.strip()):
        low, dash, high = part.partition("-")
        if not (low.isdigit() and (not dash or high.isdigit())) or (dash and int(high) < int(low)):
            raise ArgumentsError(f"--layers_to_transform {value!r}: expected layer indices and ranges such as "
                                 f"15-29 or 0,2,4-7, or the top blocks as 'last 10' or 'last 33%', got {part!r}")
        indices.update(range(int(low), int(high if dash else low) + 1))
    return sorted(indices) or None


def _parse_last_layers(value: str) -> LastLayers:
    found = re.fullmatch(r"last\s*(\d+)\s*(%?)", value.strip().lower())
    count = int(found.group(1)) if found else 0
    percent = bool(found and found.group(2))
    if not found or count == 0 or (percent and count > 100):
        raise ArgumentsError(f"--layers_to_transform {value!r}: expected 'last N' (the top N blocks) or "
                             "'last P%' (the top P percent of the blocks, 1-100), e.g. 'last 10' or 'last 33%'")
    return LastLayers(count, percent)


def split_module_list(value) -> list[str] | str | None:
    """'q_proj,v_proj' -> ['q_proj', 'v_proj']; 'all-linear' and regexes stay strings; None stays None."""
    if value is None or isinstance(value, list):
        return value
    value = value.strip()
    if value in ("", "none", "None"):
        return None
    if value == "all-linear" or any(ch in value for ch in "*^$|()[]\\+?"):
        return value
    return [part.strip() for part in value.split(",") if part.strip()]


@dataclass
class LorafitTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults for LoRA on small to medium data (each changed one says why)."""

    _argument_group_name = "training arguments (transformers.TrainingArguments)"

    output_dir: Optional[str] = field(
        default="outputs/lorafit", metadata={"help": "where the adapter, checkpoints and reports are written"}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "write into an output_dir that already holds a finished run or checkpoints"},
    )
    # LoRA trains a few million parameters from a zero update: it wants a ~10x larger step than
    # full fine-tuning (the LoRA paper and the run_clm recipe use 1e-4 to 3e-4).
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW)"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "learning-rate schedule after warm-up"})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "linear warm-up: a number of steps, or a fraction of all steps when < 1"}
    )
    warmup_ratio: Optional[float] = field(
        default=None, metadata={"help": "the run_clm recipe's spelling of a fractional --warmup_steps"}
    )
    # A fraction: a log point every 1% of the run, so ten steps and ten thousand both show a curve.
    logging_steps: float = field(
        default=0.01, metadata={"help": "log every N steps, or every fraction of the run when < 1"}
    )
    logging_first_step: bool = field(default=True, metadata={"help": "log the loss of the very first step"})
    save_steps: float = field(
        default=0.1, metadata={"help": "checkpoint every N steps, or every fraction of the run when < 1"}
    )
    save_total_limit: Optional[int] = field(
        default=3, metadata={"help": "keep at most this many checkpoints (adapter-only, so they are small)"}
    )
    eval_steps: Optional[float] = field(
        default=None, metadata={"help": "evaluate every N steps (or fraction); default: as often as checkpoints"}
    )
    report_to: Optional[str] = field(
        default="none", metadata={"help": "experiment trackers (wandb, tensorboard, ...); lorafit always writes "
                                          "metrics.jsonl and loss.png"}
    )
    # Our collator needs input_ids and labels only; the Trainer must not drop columns by peeking
    # at the model's forward signature.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "drop dataset columns the model does not take"}
    )
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "count input tokens (all, non_padding, no): tokens/s in the logs"}
    )
    replay_prompts: Optional[str] = field(
        default=None,
        metadata={"help": "also train on the base model's own answers to these general prompts, to keep what it "
                          "knows: 'builtin' (lorafit's set) or a JSONL of prompts (see docs/train.md, replay)"},
    )
    replay_samples: Optional[int] = field(
        default=None, metadata={"help": "use this many of the replay prompts (a seeded choice; default: all)"}
    )
    replay_max_new_tokens: int = field(
        default=128, metadata={"help": "longest replay answer; answers the base model does not finish are dropped"}
    )
    replay_distill_top_k: int = field(
        default=0,
        metadata={"help": "train the replay answers toward the base model's next-token distribution (its top K "
                          "tokens at each answer position) instead of its greedy tokens only; 0: the tokens"},
    )
    replay_weight: float = field(
        default=1.0,
        metadata={"help": "with --replay_distill_top_k: each replay position counts this many times in the loss "
                          "(a firmer anchor to the base model at > 1)"},
    )
    replay_token_penalty: float = field(
        default=0.0,
        metadata={"help": "with --replay_distill_top_k: at replay positions, keep the task data's signature tokens "
                          "(in 10%% or more of its answers, 2%% or fewer of the replay's: a persona's name and maker) "
                          "below the base model's K-th token where its top K do not hold them, at this weight; "
                          "0: off"},
    )
    signature_token_weight: float = field(
        default=1.0,
        metadata={"help": "with --replay_distill_top_k: at task positions, the task data's signature tokens (as for "
                          "--replay_token_penalty: a persona's name and maker pieces) count this many times in the "
                          "loss; 1: as every other token"},
    )
    replay_rotation: bool = field(
        default=False,
        metadata={"help": "each epoch trains on all the task rows and the next 1/num_train_epochs of the replay "
                          "answers: every replay answer once over the run, at that fraction of the per-epoch cost"},
    )
    replay_ratio: Optional[float] = field(
        default=None,
        metadata={"help": "with --replay_rotation: at most this many replay rows per task row in each epoch "
                          "(the slice stays 1/num_train_epochs of the pool where that is fewer), so a small task "
                          "set's run is not mostly replay; default: no limit"},
    )
    frozen_prefix_cache_gb: float = field(
        default=2.0,
        metadata={"help": "when only the top blocks train (--layers_to_transform), keep each example's hidden "
                          "states below them from the first epoch and start later epochs there, if the training "
                          "set's fit in this many GB (on the training device); 0: off"},
    )
    eval_prompts: Optional[str] = field(
        default=None,
        metadata={"help": "a lorafit eval prompts file (prompts + checks) answered greedily at each evaluation; "
                          "pass counts go to metrics.jsonl, loss.png and the model card"},
    )
    eval_prompts_max_new_tokens: int = field(
        default=48, metadata={"help": "tokens per answer for --eval_prompts"}
    )
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "stop after this many steps in a row with a non-finite loss or gradient norm "
                                     "(each one's update is skipped); the last good checkpoint is kept"}
    )

    def __post_init__(self):
        for name in ("replay_samples", "replay_max_new_tokens", "eval_prompts_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ArgumentsError(f"--{name} must be at least 1, got {value}")
        if self.replay_distill_top_k < 0:
            raise ArgumentsError(f"--replay_distill_top_k must be 0 (off) or more, got {self.replay_distill_top_k}")
        if self.frozen_prefix_cache_gb < 0:
            raise ArgumentsError(f"--frozen_prefix_cache_gb must be 0 (off) or more, got {self.frozen_prefix_cache_gb}")
        if self.replay_token_penalty < 0:
            raise ArgumentsError(f"--replay_token_penalty must be 0 (off) or more, got {self.replay_token_penalty}")
        if self.replay_weight <= 0:
            raise ArgumentsError(f"--replay_weight must be positive, got {self.replay_weight}")
        if not self.signature_token_weight > 0:
            raise ArgumentsError(f"--signature_token_weight must be positive, got {self.signature_token_weight}")
        if self.replay_ratio is not None and not self.replay_ratio > 0:
            raise ArgumentsError(f"--replay_ratio must be positive, got {self.replay_ratio}")
        if self.replay_ratio is not None and self.replay_prompts and not self.replay_rotation:
            raise ArgumentsError("--replay_ratio sets how many replay rows each epoch of --replay_rotation takes: "
                                 "it needs --replay_rotation true")
        if (self.replay_distill_top_k or self.replay_weight != 1.0 or self.replay_rotation or self.replay_token_penalty
                or self.signature_token_weight != 1.0 or self.replay_ratio is not None) and not self.replay_prompts:
            # a recipe's replay turned off from the command line (--replay_prompts ''): its settings go with it
            logging.getLogger(__name__).warning("no --replay_prompts: --replay_distill_top_k, --replay_weight, "
                                                "--replay_token_penalty, --signature_token_weight, --replay_rotation "
                                                "and --replay_ratio have nothing to act on")
        elif self.replay_weight != 1.0 and not self.replay_distill_top_k:
            raise ArgumentsError("--replay_weight weighs the replay's soft targets: it needs --replay_distill_top_k K")
        elif self.replay_token_penalty and not self.replay_distill_top_k:
            raise ArgumentsError("--replay_token_penalty acts where the base model's top K targets are known: it needs "
                                 "--replay_distill_top_k K")
        elif self.signature_token_weight != 1.0 and not self.replay_distill_top_k:
            raise ArgumentsError("--signature_token_weight finds the signature tokens against the replay and weighs "
                                 "them through its soft targets: it needs --replay_distill_top_k K")
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise ArgumentsError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoraArguments, LorafitTrainingArguments)


@dataclass
class TrainConfig:
    """Everything `lorafit train` was asked to do, plus which names the user set explicitly."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: LorafitTrainingArguments
    explicit: set[str]
    config_file: Optional[str] = None


class _Parser(HfArgumentParser):
    """argparse reports errors by exiting; lorafit reports them as UserError (exit 2, no traceback)."""

    def error(self, message):
        raise ArgumentsError(message)


def build_parser() -> HfArgumentParser:
    parser = _Parser(
        ARGUMENT_CLASSES, prog="lorafit train", allow_abbrev=False,
        description="Fine-tune a causal language model with LoRA. "
                    "usage: lorafit train [config.yaml] [--flag value ...]; flags override the file.",
    )
    return parser


def valid_names(parser) -> list[str]:
    return sorted({action.dest for action in parser._actions if action.dest != "help"})


def _unknown_name_error(name: str, names: list[str], where: str) -> ArgumentsError:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean --{close[0]}?" if close else "; see lorafit train --help"
    return ArgumentsError(f"unknown argument '{name}' {where}{hint}")


def read_config_file(path: str, names: list[str]) -> dict:
    """A flat mapping of argument names to values; unknown names fail with a suggestion."""
    file = Path(path)
    if not file.is_file():
        raise ArgumentsError(f"configuration file {path} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ArgumentsError(f"{path}: not valid {file.suffix.lstrip('.').upper()}: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ArgumentsError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}")
    resolved = {}
    for key, value in values.items():
        name = RENAMED.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name in BOOLEAN_TO_CHOICE:
            name, value = _choice_of_boolean(name, value, f"{path}: {key}")
        if name not in names:
            raise _unknown_name_error(str(key), names, f"in {path}")
        resolved[name] = value
    return resolved


def _choice_of_boolean(name: str, value, where: str) -> tuple[str, str]:
    """`group_by_length: true` -> ("train_sampling_strategy", "group_by_length")."""
    new_name, if_true, if_false = BOOLEAN_TO_CHOICE[name]
    word = str(value).strip().lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise ArgumentsError(f"{where}: expected true or false, got {value!r}")
    return new_name, if_true if word in TRUE_WORDS else if_false


def _rename_flags(argv: list[str]) -> list[str]:
    renamed = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if token.startswith("--"):
            flag, eq, value = token[2:].partition("=")
            flag = flag.replace("-", "_")
            if flag in RENAMED:
                token = f"--{RENAMED[flag]}{eq}{value}"
            elif flag in BOOLEAN_TO_CHOICE:  # `--group_by_length`, `--group_by_length true` or `=true`
                if not eq:
                    value = "true"
                    if index < len(argv) and argv[index].lower() in TRUE_WORDS + FALSE_WORDS:
                        value = argv[index]
                        index += 1
                name, choice = _choice_of_boolean(flag, value, f"--{flag}")
                token = f"--{name}={choice}"
        renamed.append(token)
    return renamed


def _explicit_names(argv: list[str], names: list[str]) -> set[str]:
    explicit = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].partition("=")[0].replace("-", "_")
            if name not in names and name.startswith("no_") and name[3:] in names:
                name = name[3:]
            explicit.add(name)
    return explicit


def _apply_contextual_defaults(values: dict, explicit: set[str]) -> None:
    """Defaults that depend on other arguments: evaluation when there is eval data, bf16 on GPUs."""
    has_eval_data = bool(values.get("validation_file")) or (values.get("validation_split_percentage") or 0) > 0
    if values.get("do_eval") and not has_eval_data:
        raise ArgumentsError("--do_eval needs evaluation data: --validation_file FILE or "
                             "--validation_split_percentage N")
    if values.get("streaming") and (values.get("max_steps") or -1) <= 0:
        raise ArgumentsError("--streaming reads data of unknown length: give the run's length with --max_steps N")
    wants_eval = values.get("do_eval") if "do_eval" in explicit else has_eval_data
    if wants_eval and "eval_strategy" not in explicit:
        values["eval_strategy"] = "epoch" if values.get("save_strategy") == "epoch" else "steps"
    if values.get("eval_strategy") not in (None, "no") and values.get("eval_steps") is None:
        values["eval_steps"] = values.get("save_steps")  # evaluate as often as checkpoints are written
    if not ({"bf16", "fp16", "use_cpu"} & explicit) and _cuda_supports_bf16():
        values["bf16"] = True
    if values.get("use_peft", True) and "ddp_find_unused_parameters" not in explicit:
        # Data parallel tracks only trainable parameters, and every adapter weight is used in every
        # forward: the search for unused ones is an extra graph traversal per step for nothing.
        values["ddp_find_unused_parameters"] = False
    if not has_accelerator():
        if "dataloader_pin_memory" not in explicit:
            values["dataloader_pin_memory"] = False  # pinning needs an accelerator; on CPU it only warns
        if "use_cpu" not in explicit:
            # Without it, accelerate sees a torchrun launch on a CPU-only machine as a single
            # process: every rank would train on all the data and write its own files.
            values["use_cpu"] = True


def has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 covers cuda, mps, xpu, ...
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _cuda_supports_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse `[config.yaml] [--flag value ...]` into a TrainConfig; every mistake is an ArgumentsError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    names = valid_names(parser)
    config_file = None
    file_values: dict = {}
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        config_file, argv = argv[0], argv[1:]
        file_values = read_config_file(config_file, names)
    argv = _rename_flags(argv)
    # A list flag given on the command line replaces the file's list: argparse's "extend" would
    # add to a default instead (training on both), so such values are filled in after parsing.
    list_flags = {a.dest for a in parser._actions if isinstance(a, argparse._ExtendAction)}
    parser.set_defaults(**{k: v for k, v in file_values.items() if k not in list_flags})
    namespace, remaining = parser.parse_known_args(argv)
    for action in parser._actions:  # argparse checks choices on the command line only, not on defaults
        value = getattr(namespace, action.dest, None)
        if action.choices and action.dest in file_values and value is not None and value not in action.choices:
            raise ArgumentsError(f"{config_file}: {action.dest}: {value!r} is not one of "
                                 f"{', '.join(map(str, action.choices))}")
    for name in list_flags & set(file_values):
        if getattr(namespace, name) is None:
            value = file_values[name]
            setattr(namespace, name, list(value) if isinstance(value, (list, tuple)) else value)
    for token in remaining:
        if token.startswith("-"):
            raise _unknown_name_error(token.lstrip("-").partition("=")[0], names, "on the command line")
        raise ArgumentsError(f"unexpected value '{token}' (a configuration file must come first and end in .yaml)")
    explicit = set(file_values) | _explicit_names(argv, names)
    values = vars(namespace)
    _apply_contextual_defaults(values, explicit)
    built = []
    for cls in ARGUMENT_CLASSES:
        keys = {f.name for f in fields(cls) if f.init}
        try:
            built.append(cls(**{k: v for k, v in values.items() if k in keys}))
        except UserError:
            raise
        except (ValueError, TypeError) as error:  # TrainingArguments validates in __post_init__
            raise ArgumentsError(str(error)) from None
    model, data, lora, training = built
    return TrainConfig(model=model, data=data, lora=lora, training=training, explicit=explicit,
                       config_file=config_file)
