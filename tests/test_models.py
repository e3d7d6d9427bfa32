"""Model resolution: the embedded model converts once, atomically, and answers sensibly."""

import os
from pathlib import Path

import pytest
import torch

from lorafit import models
from lorafit.errors import UserError


@pytest.mark.slow
def test_embedded_model_converts_once_and_is_reused(embedded_model_path, monkeypatch):
    folder = Path(embedded_model_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def must_not_convert(*args, **kwargs):
        raise AssertionError("a second resolution converted again instead of reusing the cache")

    monkeypatch.setattr(models, "_convert_gguf", must_not_convert)
    assert models.resolve_model_path("smollm2-135m-instruct") == embedded_model_path
    assert models.resolve_model_path(None) == embedded_model_path
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "staging folders left behind"


@pytest.mark.slow
def test_embedded_model_answers_a_chat_prompt(embedded_model_path):
    model, tokenizer = models.load_model_and_tokenizer(embedded_model_path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch, tiny_llama):
    """A crash half-way through writing must leave neither a cache folder nor staging debris."""
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path))

    class TokenizerThatCrashesOnSave:
        eos_token_id, bos_token_id, pad_token_id = 2, 1, 2

        def convert_tokens_to_ids(self, token):
            return 2

        def save_pretrained(self, folder):
            assert any(Path(folder).iterdir()), "the model should be half-written by now"
            raise KeyboardInterrupt

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: TokenizerThatCrashesOnSave())
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: tiny_llama)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model_path(None)
    assert list(models.embedded_model_dir().parent.iterdir()) == []


def test_missing_local_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.resolve_model_path("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        models.resolve_model_path(str(tmp_path / "empty"))


def test_parse_dtype():
    assert models.parse_dtype("bf16") is torch.bfloat16
    assert models.parse_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="float32"):
        models.parse_dtype("float8")


def test_home_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path))
    assert str(models.embedded_model_dir()).startswith(str(tmp_path))
    assert os.fspath(models.lorafit_home()) == str(tmp_path)


def test_a_link_to_a_model_cache_not_made_yet_is_followed(tmp_path):
    from lorafit.models import make_folder

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").symlink_to(tmp_path / "shared" / "models", target_is_directory=True)
    make_folder(tmp_path / "home" / "models")
    assert (tmp_path / "shared" / "models").is_dir() and (tmp_path / "home" / "models").is_dir()
    make_folder(tmp_path / "home" / "models")  # and again, once it exists
