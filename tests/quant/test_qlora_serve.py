"""A quantized base behind `lorafit serve` (and the engine chat/generate use): answers over HTTP
equal the engine's on the same 4-bit model, and the several-adapter server runs on it too."""

from __future__ import annotations

import openai
import pytest

import lorafit
from lorafit.data.render import render_prompt
from lorafit.infer.generate import generate
from lorafit.infer.loading import load_for_inference, load_with_adapters
from lorafit.infer.options import GenerationOptions
from lorafit.infer.serve import ServedModel, create_app
from lorafit.quant import QuantizationSpec
from server_helpers import running_app

pytest.importorskip("bitsandbytes")
SPEC = QuantizationSpec.from_flags(4)
QUESTION = [{"role": "user", "content": "Name a colour."}]



@pytest.fixture(scope="session")
def tiny_model_dir(wide_tiny_model_dir):
    """These tests load the base 4-bit for inference: the 64-wide tiny model (tests/conftest.py)."""
    return wide_tiny_model_dir

@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    model = lorafit.add_lora(lorafit.models.load_model(tiny_model_dir),
                             lorafit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return lorafit.save_adapter(model, tmp_path_factory.mktemp("qlora-serve") / "adapter",
                                base_model_name_or_path=tiny_model_dir)


def engine_answer(loaded, adapter_id=None):
    prompt = render_prompt(loaded.tokenizer, QUESTION)
    (completion,) = generate(loaded.model, [prompt], GenerationOptions(temperature=0, max_new_tokens=8),
                             stop_token_ids=loaded.stop_token_ids, pad_token_id=loaded.tokenizer.pad_token_id,
                             tokenizer=loaded.tokenizer, adapter_id=adapter_id)
    return completion.text


def ask(url, model):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=8)
    return reply.choices[0].message.content


def test_a_4bit_base_with_its_adapter_serves_what_the_engine_answers(tiny_model_dir, adapter):
    loaded = load_for_inference(tiny_model_dir, str(adapter), quantization=SPEC)
    served = ServedModel(loaded, GenerationOptions(max_new_tokens=8), max_batch_size=2)
    try:
        with running_app(create_app(served, "q")) as url:
            assert ask(url, "q") == engine_answer(loaded)
    finally:
        served.close()


def test_several_adapters_on_a_4bit_base(tiny_model_dir, adapter):
    loaded = load_with_adapters(tiny_model_dir, {"a": adapter}, quantization=SPEC)
    served = ServedModel(loaded, GenerationOptions(max_new_tokens=8), max_batch_size=2)
    try:
        with running_app(create_app(served, "base")) as url:
            assert ask(url, "a") == engine_answer(loaded, "a")
            assert ask(url, "base") == engine_answer(loaded)
    finally:
        served.close()
