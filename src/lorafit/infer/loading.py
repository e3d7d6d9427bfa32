"""Loading a model for inference: base + optional adapter + the tokenizer it was trained with.

The tokenizer comes from the adapter folder when it has one: training saves its tokenizer there
with the chat template it rendered the data with, so inference renders prompts exactly as training
did. Otherwise it is the base model's tokenizer, with `--template` applied the way training applies
it (`lorafit.data.templates.set_chat_template`).

For generation the adapter is folded into the weights (`merge_lora`): same outputs, and no extra
matrix products per token. On CPU in float32 the linear layers then run through oneDNN
(`lorafit.infer.cpu_linear`), faster than MKL's sgemm for the few rows a decode step has.

Several adapters (`--adapter NAME=DIR` repeated) stay unmerged on one base, behind switches
(`lorafit.lora.multi`): `LoadedModel.answerers` lists the base and each adapter, each with the
tokenizer (chat template) and stop tokens it renders and stops with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafit.errors import UserError
from lorafit.models import EMBEDDED_MODEL, is_embedded

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class Answerer:
    """One way the loaded model answers: as loaded, or through one of its named adapters."""

    name: str  # what clients and outputs call it
    adapter_id: str | None  # the routing name (`lorafit.lora.multi`); None: the model as loaded
    tokenizer: object  # renders its prompts: the adapter's own chat template when it saved one
    stop_token_ids: list[int]


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    stop_token_ids: list[int]
    name: str  # what to call it (served model id, logs)
    # The named adapters, when several were loaded side by side (`--adapter NAME=DIR` ...).
    adapters: list[Answerer] = field(default_factory=list)

    @property
    def answerers(self) -> list[Answerer]:
        """Who can answer: the model as loaded (`name`), then each named adapter."""
        return [Answerer(self.name, None, self.tokenizer, self.stop_token_ids)] + self.adapters

    @property
    def compared(self) -> list[Answerer]:
        """What chat and generate answer with: each named adapter, else the model as loaded."""
        return self.adapters or self.answerers


def add_model_arguments(parser: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model_name_or_path", default=None,
                       help="base model: a folder or a Hub id (default: the adapter's base, else the embedded "
                            "smollm2-135m-instruct)")
    group.add_argument("--adapter", action="append", default=None, required=adapter_required, metavar="[NAME=]DIR",
                       help="a LoRA adapter folder (lorafit or PEFT layout); repeat it (NAME=DIR) to load several "
                            "adapters on one base: serve answers each request with the one its `model` names, "
                            "chat and generate answer with each, side by side")
    group.add_argument("--template", default="auto",
                       help="chat template when the adapter folder carries no tokenizer: auto (the tokenizer's own), "
                            "default, alpaca, chatml, or a .jinja file (default: auto)")
    group.add_argument("--dtype", default="auto",
                       help="weights dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    group.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, mps ...")
    group.add_argument("--trust_remote_code", action="store_true", help="allow model code from the Hub (off by default)")
    group.add_argument("--quantization_bit", type=int, default=None, choices=[4, 8],
                       help="quantize the base to 4 or 8 bits as it loads (bitsandbytes: pip install "
                            "'lorafit[qlora]'); the adapter is applied unmerged, in float")
    group.add_argument("--quant_type", default=None, help="4-bit data type: nf4 (default) or fp4")
    group.add_argument("--double_quant", default=None, type=_yes_no, metavar="true|false",
                       help="4-bit: quantize the block scales too (default: true)")


def _yes_no(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return lowered in ("true", "yes", "1")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UserError(f"--device {device!r}: {error}") from None
    if resolved.type == "cuda" and (not torch.cuda.is_available()
                                    or (resolved.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} usable CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    from lorafit.models import parse_dtype

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return parse_dtype(dtype)
    except ValueError as error:
        raise UserError(f"--dtype: {error}") from None


def adapter_base_model(adapter: str | Path) -> str | None:
    """The base model named in the adapter's config, when there is one."""
    config_file = Path(adapter) / "adapter_config.json"
    try:
        return json.loads(config_file.read_text()).get("base_model_name_or_path") or None
    except (OSError, json.JSONDecodeError):
        return None


def check_adapter_folder(adapter: str | Path) -> Path:
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise UserError(f"--adapter {adapter}: no such folder")
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: not an adapter folder (no adapter_config.json)")
    return path


def choose_base_model(model_name_or_path: str | None, adapter: Path | None) -> str | None:
    """An explicit base wins; else the adapter's own base (a folder, the embedded model or a Hub id);
    else, when the adapter names none, the embedded model."""
    if model_name_or_path or adapter is None:
        return model_name_or_path
    named = adapter_base_model(adapter)
    if not named:
        return None
    looks_like_path = named.startswith(("/", ".", "~")) or named.count("/") > 1
    if looks_like_path and not Path(named).expanduser().is_dir():
        raise UserError(f"{adapter}/adapter_config.json names the base model {named}, which is not on this machine; "
                        "pass --model_name_or_path with the model it was trained on")
    logger.info("base model from %s/adapter_config.json: %s", adapter, named)
    return named


def load_inference_tokenizer(base: str | None, adapter: Path | None, template: str = "auto",
                             trust_remote_code: bool = False):
    """The adapter's tokenizer (with its training chat template) when it has one, else the base's."""
    from transformers import AutoTokenizer

    from lorafit.data.templates import set_chat_template
    from lorafit.models import check_file_references, load_tokenizer, refusing_remote_code

    if adapter is not None and any((adapter / name).is_file() for name in TOKENIZER_FILES):
        check_file_references(adapter)
        with refusing_remote_code(str(adapter), trust_remote_code):
            tokenizer = AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if template != "auto":
            logger.warning("--template %s overrides the chat template saved with the adapter in %s", template, adapter)
    else:
        tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
    return set_chat_template(tokenizer, template)


def load_for_inference(
    model_name_or_path: str | None = None,
    adapter: str | None = None,
    template: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    merge: bool = True,
    quantization=None,
) -> LoadedModel:
    """Base model (+ adapter, merged unless `merge=False`) in eval mode, and its tokenizer.

    A quantized base (`quantization`, a `lorafit.quant.QuantizationSpec`) keeps its adapter
    unmerged: merging would round the update into 4/8-bit weights."""
    from lorafit.data.templates import end_of_turn_token_ids
    from lorafit.lora import load_adapter, merge_lora
    from lorafit.models import load_model

    adapter_path = check_adapter_folder(adapter) if adapter else None
    base = choose_base_model(model_name_or_path, adapter_path)
    target_device = resolve_device(device)
    tokenizer = load_inference_tokenizer(base, adapter_path, template, trust_remote_code)
    if quantization is not None:
        from lorafit.quant.bnb import device_map_for

        merge = False
        model = load_model(base, trust_remote_code=trust_remote_code, quantization=quantization,
                           device_map=device_map_for(target_device))
    else:
        model = load_model(base, dtype=resolve_dtype(dtype, target_device), trust_remote_code=trust_remote_code)
    if adapter_path is not None:
        load_adapter(model, adapter_path)
        if merge:
            merge_lora(model)
    if quantization is None:
        model.to(target_device)  # a quantized model was loaded onto its device
    model.eval()
    if merge:  # an unmerged adapter's layers stay as they are
        from lorafit.infer.cpu_linear import use_onednn_linear

        use_onednn_linear(model)
    return LoadedModel(model, tokenizer, end_of_turn_token_ids(tokenizer), _model_name(base, adapter_path))


def _model_name(base: str | None, adapter: Path | None) -> str:
    if adapter is not None:
        return adapter.resolve().name
    if is_embedded(base):
        return EMBEDDED_MODEL
    return Path(base).name if Path(base).expanduser().is_dir() else base


def parse_adapter_flags(values: list[str] | None) -> dict[str, Path] | Path | None:
    """`--adapter` values: one DIR (the adapter folded into the model), or several NAME=DIR / DIR
    (named adapters side by side; a bare DIR is named after its folder)."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return check_adapter_folder(values[0])
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            name, folder = Path(value).expanduser().resolve().name, value
        if not name.strip() or not folder.strip():
            raise UserError(f"--adapter {value!r}: expected NAME=DIR or DIR")
        if name in adapters:
            raise UserError(f"--adapter: two adapters are named {name!r}; name them apart with NAME=DIR")
        adapters[name] = check_adapter_folder(folder)
    return adapters


def load_from_args(args: argparse.Namespace, merge: bool = True) -> LoadedModel:
    adapters = parse_adapter_flags(args.adapter)
    common = dict(template=args.template, dtype=args.dtype, device=args.device,
                  trust_remote_code=args.trust_remote_code, quantization=quantization_from_args(args))
    if isinstance(adapters, dict):
        return load_with_adapters(args.model_name_or_path, adapters, **common)
    return load_for_inference(args.model_name_or_path, adapters, merge=merge, **common)


def load_with_adapters(model_name_or_path: str | None, adapters: dict[str, Path], template: str = "auto",
                       dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
                       quantization=None) -> LoadedModel:
    """The base model with several named adapters behind switches (`lorafit.lora.multi`), unmerged:
    every request or row picks one. Each adapter renders prompts with its own saved tokenizer."""
    from lorafit.data.templates import end_of_turn_token_ids
    from lorafit.lora.multi import load_adapters

    bases = {name: adapter_base_model(path) for name, path in adapters.items()}
    if model_name_or_path is None and len(set(bases.values())) > 1:
        listed = ", ".join(f"{name}: {base or 'none named'}" for name, base in bases.items())
        raise UserError(f"the adapters name different base models ({listed}); pass --model_name_or_path "
                        "with the one they all apply to")
    base = choose_base_model(model_name_or_path, next(iter(adapters.values())))
    loaded = load_for_inference(base, None, template=template, dtype=dtype, device=device,
                                trust_remote_code=trust_remote_code, merge=False, quantization=quantization)
    try:
        load_adapters(loaded.model, adapters)
    except UserError as error:
        raise UserError(f"--adapter: {error}") from None
    if quantization is None:  # the shared base layers decode through oneDNN, as a merged model does
        from lorafit.infer.cpu_linear import use_onednn_linear

        use_onednn_linear(loaded.model)
    vocabulary = loaded.tokenizer.get_vocab()
    answerers = []
    for name, path in adapters.items():
        tokenizer = load_inference_tokenizer(base, path, template, trust_remote_code)
        if tokenizer.get_vocab() != vocabulary:
            raise UserError(f"--adapter {name}={path}: its tokenizer's vocabulary differs from the base model's "
                            f"({len(tokenizer)} vs {len(loaded.tokenizer)} tokens); serve it on its own")
        answerers.append(Answerer(name, name, tokenizer, end_of_turn_token_ids(tokenizer)))
    return dataclasses.replace(loaded, adapters=answerers)


def quantization_from_args(args: argparse.Namespace):
    from lorafit.quant import QuantizationSpec

    return QuantizationSpec.from_flags(getattr(args, "quantization_bit", None), getattr(args, "quant_type", None),
                                       getattr(args, "double_quant", None))
