"""Safe loading: a pickle payload is refused in one line, safetensors come first, and loading a
current PEFT adapter warns only about config keys that would change the outputs."""

from __future__ import annotations

import json
import logging
import os
import warnings

import peft
import pytest
import torch

import lorafit
from lorafit.errors import UserError
from lorafit.lora.adapter_io import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from model_builders import build_tiny_llama


class RunsCodeWhenUnpickled:
    """What a malicious adapter_model.bin carries: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def saved_adapter(folder):
    lorafit.save_adapter(lorafit.add_lora(build_tiny_llama(), lorafit.LoraConfig()), folder)
    return lorafit.lora.adapter_io.read_adapter_tensors(folder)


def write_pickle_payload(folder, tensors, marker):
    torch.save({**tensors, "payload": RunsCodeWhenUnpickled(marker)}, folder / LEGACY_WEIGHTS_NAME)


def test_a_pickle_payload_is_refused_in_one_line_naming_the_file(tmp_path):
    tensors = saved_adapter(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    marker = tmp_path / "payload-ran"
    write_pickle_payload(tmp_path, tensors, marker)
    with pytest.raises(UserError) as error:
        lorafit.load_adapter(build_tiny_llama(), tmp_path)
    message = str(error.value)
    assert "\n" not in message and len(message) < 300
    assert str(tmp_path / LEGACY_WEIGHTS_NAME) in message and WEIGHTS_NAME in message  # the file, and what to use
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained torch traceback
    assert not marker.exists()


def test_safetensors_are_read_before_a_pickle_file(tmp_path):
    tensors = saved_adapter(tmp_path)
    marker = tmp_path / "payload-ran"
    write_pickle_payload(tmp_path, tensors, marker)  # beside a good adapter_model.safetensors
    lorafit.load_adapter(build_tiny_llama(), tmp_path)
    assert not marker.exists()


def test_a_plain_tensor_pickle_still_loads(tmp_path):
    tensors = saved_adapter(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save(tensors, tmp_path / LEGACY_WEIGHTS_NAME)
    model = lorafit.load_adapter(build_tiny_llama(), tmp_path)
    loaded = lorafit.lora.adapter_io.adapter_state_dict(model)
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)


def test_a_truncated_safetensors_file_is_a_one_line_error(tmp_path):
    saved_adapter(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match="not a readable safetensors file") as error:
        lorafit.load_adapter(build_tiny_llama(), tmp_path)
    assert "\n" not in str(error.value)


def test_an_adapter_saved_by_current_peft_loads_without_warnings(tmp_path, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build_tiny_llama(), peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        theirs.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    inert = {"eva_config", "corda_config", "loftq_config", "runtime_config"} & set(written)
    assert inert, "PEFT no longer writes the keys this test is about"
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        lorafit.load_adapter(build_tiny_llama(), tmp_path)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lorafit")] == []


def test_only_keys_that_would_change_the_outputs_are_reported(tmp_path, caplog):
    saved_adapter(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # An unknown key switched on warns, by name and value; unknown keys left off do not.
    config_path.write_text(json.dumps({**config, "future_scale": 2.0, "future_feature": None, "future_flag": False,
                                       "eva_config": {"rho": 2.0}}))
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        lorafit.load_adapter(build_tiny_llama(), tmp_path)
    warned = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("lorafit"))
    assert "future_scale=2.0" in warned
    assert "future_feature" not in warned and "future_flag" not in warned and "eva_config" not in warned
    # A known feature that changes the layers is refused, not ignored.
    config_path.write_text(json.dumps({**config, "layer_replication": [[0, 2], [1, 2]]}))
    with pytest.raises(UserError, match="layer_replication"):
        lorafit.load_adapter(build_tiny_llama(), tmp_path)
