"""`lorafit merge`: fold an adapter into its base and write a complete Hugging Face model folder.

    lorafit merge --adapter out/adapter --output_dir out/merged [--dtype bfloat16]

The folder holds safetensors weights (sharded past `--max_shard_size`), `config.json`,
`generation_config.json` whose `eos_token_id` lists the end-of-turn tokens of the training template
(so plain `model.generate` stops where `lorafit chat` stops), and the tokenizer with that chat
template. Plain `transformers.AutoModelForCausalLM.from_pretrained` loads it; lorafit is not needed.

Before reporting success we check the result on a probe conversation: the base + adapter (unmerged,
fp32) logits are the reference; the merged model in memory must match them to fp32 precision, and
the folder, reloaded from disk by plain transformers, must match them to the precision of `--dtype`.
The folder is written beside its destination and moved into place only when both checks pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import UserError
from lorafit.infer.loading import check_adapter_folder, choose_base_model, load_inference_tokenizer
from lorafit.infer.staging import check_output_folder, staged_folder
from lorafit.lora import load_adapter, merge_lora
from lorafit.lora.weighted import COMBINATIONS

PROBE_MESSAGES = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Explain in one sentence why the sky is blue, then count from 1 to 5."},
]
# Merged vs unmerged in fp32 differ only by summation order: W x + s B (A x) vs (W + s B A) x.
FP32_TOLERANCE = 1e-4
# Relative size of the logit error (||reloaded - reference|| / ||reference||) allowed per saved dtype:
# rounding every weight to a 8-bit (bf16) or 11-bit (fp16) mantissa moves logits by about this much.
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class MergeCheckError(UserError):
    """The merged model does not reproduce base + adapter; nothing was written."""


@dataclass
class ProbeComparison:
    max_abs_diff: float
    relative_error: float
    tokens: int

    def describe(self) -> str:
        return (f"max |logit difference| {self.max_abs_diff:.2e}, relative error {self.relative_error:.2e} "
                f"over {self.tokens} probe tokens")


def compare_logits(candidate: torch.Tensor, reference: torch.Tensor) -> ProbeComparison:
    candidate, reference = candidate.float(), reference.float()
    difference = candidate - reference
    return ProbeComparison(
        max_abs_diff=difference.abs().max().item(),
        relative_error=(difference.norm() / reference.norm().clamp(min=1e-12)).item(),
        tokens=reference.shape[-2],
    )


@torch.inference_mode()
def probe_logits(model, probe_ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(torch.tensor([probe_ids], device=device)).logits[0].float().cpu()


def saved_dtype(config) -> torch.dtype:
    """The dtype the base checkpoint was saved in (float32 when its config does not say)."""
    from lorafit.models import parse_dtype

    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    try:
        parsed = parse_dtype(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, torch.dtype) else torch.float32


def target_dtype(requested: str, config) -> torch.dtype:
    from lorafit.models import parse_dtype

    if requested == "auto":
        return saved_dtype(config)
    try:
        return parse_dtype(requested)
    except ValueError as error:
        raise UserError(f"--dtype: {error}") from None


def generation_config_for(model, tokenizer, stop_token_ids: list[int]):
    """The base's generation settings, with the template's end-of-turn tokens as EOS."""
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    if stop_token_ids:
        config.eos_token_id = stop_token_ids if len(stop_token_ids) > 1 else stop_token_ids[0]
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    return config


def check_push_possible(repo: str | None) -> None:
    if repo is None:
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"--push_to_hub {repo}: the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1). "
                        "Unset HF_HUB_OFFLINE (and log in with `hf auth login`) to upload, or leave out "
                        "--push_to_hub and upload the folder later.")


def push(folder: Path, repo: str, private: bool) -> str:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="Upload model merged by lorafit")
    except Exception as error:  # no network, no token, no permission: all the user's to fix
        raise UserError(f"--push_to_hub {repo}: upload failed ({type(error).__name__}: {error}); "
                        f"the merged model is saved in {folder}") from None
    return f"https://huggingface.co/{repo}"


def render_probe(tokenizer) -> list[int]:
    """The probe conversation, without its system message when the template refuses system roles."""
    from lorafit.data.errors import BadRecordError
    from lorafit.data.render import render_prompt

    try:
        return render_prompt(tokenizer, PROBE_MESSAGES)
    except BadRecordError:
        return render_prompt(tokenizer, [m for m in PROBE_MESSAGES if m["role"] != "system"])


@dataclass
class MergedModel:
    model: object  # a plain transformers model in float32, the adapter folded in
    tokenizer: object  # the adapter's tokenizer (its training chat template) or the base's
    stop_token_ids: list[int]  # the template's end-of-turn tokens, then EOS
    probe: list[int]  # the probe conversation's token ids
    reference: torch.Tensor  # base + adapter (unmerged, float32) logits on the probe


def quantized_training_bits(adapter: Path) -> int | None:
    """`--quantization_bit` of the run that trained `adapter`, from its lorafit_config.yaml (QLoRA)."""
    import yaml

    path = Path(adapter) / "lorafit_config.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return config.get("quantization_bit") if isinstance(config, dict) else None


def load_merged_model(adapter: Path, base: str | None, template: str = "auto", trust_remote_code: bool = False,
                      log=print) -> MergedModel:
    """Base + adapter folded into one float32 model, checked against the unmerged model on the probe.
    `lorafit merge` saves it as a folder; `lorafit export --format gguf` writes it as one GGUF file."""
    from lorafit.data.templates import end_of_turn_token_ids
    from lorafit.models import load_model

    tokenizer = load_inference_tokenizer(base, adapter, template, trust_remote_code)
    bits = quantized_training_bits(adapter)
    if bits:
        log(f"the adapter was trained on a {bits}-bit quantized base; it is merged into the full-precision "
            "base (merging into quantized weights would round the update away)")
    probe = render_probe(tokenizer)
    # Merging happens in fp32 whatever the saved dtype, so the sum W + s B A is not rounded twice.
    model = load_model(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    load_adapter(model, adapter).eval()  # eval after injection: new LoRA layers start in train mode (dropout)
    reference = probe_logits(model, probe)
    merge_lora(model)
    in_memory = compare_logits(probe_logits(model, probe), reference)
    if not in_memory.max_abs_diff <= FP32_TOLERANCE * max(1.0, reference.abs().max().item()):
        raise MergeCheckError(f"the merged model does not reproduce base + adapter ({in_memory.describe()}); "
                              "nothing was written")
    log(f"merge check (fp32, in memory): {in_memory.describe()}: OK")
    return MergedModel(model, tokenizer, end_of_turn_token_ids(tokenizer), probe, reference)


def merge_and_save(args: argparse.Namespace, log=print, adapter: Path | None = None) -> Path:
    """Merge `adapter` (default: the one `--adapter`) into its base and write the model folder."""
    from transformers import AutoModelForCausalLM

    output = Path(args.output_dir).expanduser()
    check_output_folder(output, args.overwrite_output_dir)
    adapter = adapter or check_adapter_folder(args.adapter[0])
    base = choose_base_model(args.model_name_or_path, adapter)
    for source, name in ((Path(adapter), "--adapter"), (Path(str(base)), "the base model")):
        if output.exists() and source.exists() and output.resolve() == source.resolve():
            raise UserError(f"--output_dir {output} is {name}'s folder: the merge would delete its input; "
                            "choose another --output_dir")
    merged = load_merged_model(adapter, base, args.template, args.trust_remote_code, log)
    model, tokenizer, probe, reference = merged.model, merged.tokenizer, merged.probe, merged.reference
    dtype = target_dtype(args.dtype, model.config)

    with staged_folder(output) as staging:
        model.to(dtype)
        model.config.dtype = dtype
        model.generation_config = generation_config_for(model, tokenizer, merged.stop_token_ids)
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(staging)
        del model, merged  # one model in memory at a time: the reload below is the second

        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=dtype,
                                                        trust_remote_code=args.trust_remote_code).eval()
        on_disk = compare_logits(probe_logits(reloaded, probe), reference)
        del reloaded
        if not on_disk.relative_error <= RELATIVE_TOLERANCE[dtype]:
            raise MergeCheckError(f"the saved model, reloaded by transformers in {dtype}, does not reproduce "
                                  f"base + adapter ({on_disk.describe()}); nothing was written")
        log(f"reload check ({str(dtype).removeprefix('torch.')}, plain transformers): {on_disk.describe()}: OK")
    return output


def merge_combined(args: argparse.Namespace, adapters: list[Path], log=print) -> Path:
    """Several adapters: their weighted combination as an adapter folder (`--adapter_only`), or
    merged into the base as a model folder."""
    from lorafit.infer.combine import adapter_weights, combine_into, write_combined

    weights = adapter_weights(args.adapter_weights, len(adapters))
    described = " + ".join(f"{w:g} x {a.name}" for w, a in zip(weights, adapters))
    if args.adapter_only:
        output = write_combined(Path(args.output_dir).expanduser(), adapters, weights, args.combination_type,
                                args.overwrite_output_dir)
        print(f"combined adapter ({args.combination_type}: {described}) written to {output}", file=sys.stderr)
        return output
    if args.model_name_or_path is None:  # the base the adapters name (all the same one, or given)
        args.model_name_or_path = choose_base_model(None, adapters[0])
    with tempfile.TemporaryDirectory(prefix="lorafit-combined-") as folder:
        combined = combine_into(Path(folder), adapters, weights, args.combination_type)
        log(f"combined {args.combination_type}: {described}")
        output = merge_and_save(args, log, adapter=combined)
    print(f"merged model ({described}) written to {output}", file=sys.stderr)
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafit merge",
        description="Fold a LoRA adapter into its base model and write a complete Hugging Face model folder "
                    "(safetensors, config, generation_config, tokenizer with its chat template), checked "
                    "against base + adapter on a probe input before it is reported as done.",
    )
    parser.add_argument("--model_name_or_path", default=None,
                        help="base model (default: the adapter's base_model_name_or_path, else the embedded model)")
    parser.add_argument("--adapter", required=True, action="append", metavar="DIR",
                        help="the LoRA adapter folder to merge; given more than once, the adapters are combined "
                             "first (weighted by --adapter_weights, PEFT's add_weighted_adapter)")
    parser.add_argument("--adapter_weights", type=float, nargs="+", default=None, metavar="W",
                        help="one weight per --adapter, in order (default: 1.0 each); negative subtracts")
    parser.add_argument("--combination_type", choices=COMBINATIONS, default="cat",
                        help="cat: exact weighted sum of the updates, rank = sum of ranks (default); linear: "
                             "PEFT's cheap approximation at the adapters' common rank")
    parser.add_argument("--adapter_only", action="store_true",
                        help="write the combined adapter folder instead of a merged model")
    parser.add_argument("--output_dir", required=True, help="where to write the merged model folder")
    parser.add_argument("--dtype", default="auto",
                        help="dtype of the saved weights: auto (the base's), float32, bfloat16, float16")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file before sharding (default: 5GB)")
    parser.add_argument("--template", default="auto",
                        help="chat template to save when the adapter folder carries no tokenizer "
                             "(auto, default, alpaca, chatml or a .jinja file)")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace a non-empty --output_dir")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO", help="also upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the Hub")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_push_possible(args.push_to_hub)  # before minutes of work, not after
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    adapters = [check_adapter_folder(a) for a in args.adapter]
    combined = len(adapters) > 1 or args.adapter_weights is not None or args.adapter_only
    if not combined:
        output = merge_and_save(args, log)
        print(f"merged model written to {output}", file=sys.stderr)
    else:
        output = merge_combined(args, adapters, log)
    if args.push_to_hub:
        print(f"uploaded to {push(output, args.push_to_hub, args.private)}", file=sys.stderr)
    return 0
