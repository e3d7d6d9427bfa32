"""Quantized loading that keeps only what the quantized model needs in memory.

transformers already quantizes on the fly one tensor at a time (each float weight is read,
packed by bitsandbytes, and dropped before the next). What it also does is open each safetensors
file once, as one memory map shared by every tensor of that file: the float embeddings, norms and
output head, which are not quantized, are used straight from that map, so the map stays open for
the model's whole life, and with it every page of the file that quantizing read. On a 0.4B model
that is the whole 1.5 GB checkpoint in the process's resident memory (file pages, beside the
packed weights), as much as the float model itself holds.

Here each tensor is read through its own memory map (`TensorOnDemand`), which lives exactly as
long as the tensor: a weight that is quantized releases its map, and its file pages, as soon as it
is packed; a tensor kept as it is (embeddings, norms, head) keeps only its own pages mapped. The
tensors themselves, and the quantization of each, are the ones transformers would produce (the
same bytes go through the same bitsandbytes calls), which `tests/quant/test_quantized_loading.py`
checks bit for bit. Only local folders of safetensors files whose architecture transformers
knows take this way; anything else (a Hub id, `.bin` files, a model with its own code) loads the
usual way.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class TensorOnDemand:
    """One checkpoint tensor, read when indexed (`tensor[...]`, what transformers' loader calls on
    a safetensors slice) through a memory map of its own, so the map dies with the tensor."""

    def __init__(self, file: Path, name: str):
        self.file, self.name = file, name

    def __getitem__(self, index):
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as handle:
            return handle.get_slice(self.name)[index]

    def __repr__(self) -> str:
        return f"TensorOnDemand({self.file.name}:{self.name})"


def checkpoint_tensors(folder: str | Path) -> dict[str, TensorOnDemand] | None:
    """Every tensor of the folder's safetensors checkpoint (one file or an index of shards), by name,
    unread; None when the folder has no safetensors checkpoint."""
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        return None
    tensors = {}
    for file in files:
        path = (folder / file).resolve()
        if not path.is_relative_to(folder.resolve()):
            raise ValueError(f"{folder / INDEX_FILE} names a file outside the folder: {file}")
        with safe_open(path, framework="pt") as handle:
            tensors.update({name: TensorOnDemand(path, name) for name in handle.keys()})
    return tensors


def causal_lm_class(config):
    """transformers' own class for this config, or None (a model that brings its own code)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def load_quantized(path: str, trust_remote_code: bool = False, **kwargs):
    """Load a causal LM quantized on the fly (`kwargs` carries `quantization_config`, `dtype`,
    `device_map`, ... as for `from_pretrained`), one tensor's memory map at a time when the folder
    allows it, else the usual way."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    usual = dict(trust_remote_code=trust_remote_code, **kwargs)
    if not os.path.isdir(path):
        return AutoModelForCausalLM.from_pretrained(path, **usual)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model_class = causal_lm_class(config)
    tensors = checkpoint_tensors(path) if model_class is not None and not hasattr(config, "auto_map") else None
    if tensors is None:
        logger.debug("%s: loading the usual way (no safetensors checkpoint or a model with its own code)", path)
        return AutoModelForCausalLM.from_pretrained(path, **usual)
    model = model_class.from_pretrained(None, config=config, state_dict=tensors, **kwargs)
    # from_pretrained(None, ...) knows no folder: put back what it would have read from it.
    model.config._name_or_path = model.name_or_path = path
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model
