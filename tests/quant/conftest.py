"""The quantization tests' tiny base model, saved once per session as a model folder."""

from __future__ import annotations

import pytest

from model_builders import build_tiny_llama


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A tiny Llama folder with layers wide enough for bitsandbytes' 4-bit blocks."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(folder)
    return str(folder)
