"""Bad input to `lorafit export`: one clear message, exit 2, and no file (partial or whole) left behind."""

from __future__ import annotations

import pytest

from export_helpers import export, make_adapter, save_base
from model_builders import build_tiny_gpt2, build_tiny_llama


@pytest.fixture(scope="module")
def adapter(tiny_bases, tiny_tokenizer, tmp_path_factory):
    return make_adapter(tiny_bases["llama"], tmp_path_factory.mktemp("adapter"), tiny_tokenizer)


def files_in(folder):
    return sorted(path.name for path in folder.iterdir())


def fails_cleanly(capsys, folder, *argv) -> str:
    """Run the export; it must exit 2 with one line on stderr and leave `folder` as it was."""
    before = files_in(folder)
    assert export(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit export: error: ") and "Traceback" not in err
    assert files_in(folder) == before, "a file was left behind"
    return err


def test_missing_adapter(capsys, tmp_path):
    err = fails_cleanly(capsys, tmp_path, "--adapter", tmp_path / "nope", "--format", "gguf-lora")
    assert "--adapter" in err and "no such folder" in err


def test_adapter_for_another_base(adapter, tiny_tokenizer, capsys, tmp_path):
    wider = save_base(build_tiny_llama(vocab_size=len(tiny_tokenizer), hidden_size=48), tiny_tokenizer, tmp_path / "b")
    for fmt in ("gguf-lora", "gguf"):
        err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", fmt, "--model_name_or_path", wider,
                            "--output", tmp_path / "out.gguf")
        assert "does not fit" in err and "q_proj" in err


def test_unwritable_output(adapter, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf-lora",
                        "--output", blocker / "lora.gguf")
    assert f"--output {blocker / 'lora.gguf'}: cannot write there, {blocker} is a file, not a folder" in err
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        probe = read_only / "probe"
        try:
            probe.write_text("root ignores permissions")
        except PermissionError:  # an ordinary user: the folder really is unwritable
            err = fails_cleanly(capsys, read_only, "--adapter", adapter, "--format", "gguf-lora",
                                "--output", read_only / "lora.gguf")
            assert f"cannot write in {read_only} (Permission denied)" in err
        else:
            probe.unlink()
    finally:
        read_only.chmod(0o700)


def test_existing_output_needs_overwrite_and_a_folder_is_refused(adapter, capsys, tmp_path):
    existing = tmp_path / "lora.gguf"
    existing.write_text("mine")
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf-lora", "--output", existing)
    assert "exists: pass --overwrite" in err and existing.read_text() == "mine"
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf-lora", "--output", tmp_path)
    assert "is a folder" in err


def test_unsupported_outtype(adapter, capsys, tmp_path):
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf", "--outtype", "q4_0")
    assert "--outtype q4_0: expected one of f32, f16, bf16, q8_0" in err and "llama-quantize" in err


def test_unsupported_architecture(tiny_tokenizer, capsys, tmp_path):
    gpt2 = save_base(build_tiny_gpt2(vocab_size=len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "gpt2")
    adapter = make_adapter(gpt2, tmp_path / "adapter", tiny_tokenizer, target_modules=["c_attn"])
    for fmt in ("gguf-lora", "gguf"):
        err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", fmt, "--output", tmp_path / "o.gguf")
        assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in err and "GPT2LMHeadModel" in err


def test_modules_to_save_cannot_be_a_llama_cpp_lora_but_can_be_merged(tiny_bases, tiny_tokenizer, capsys, tmp_path):
    adapter = make_adapter(tiny_bases["llama"], tmp_path / "adapter", tiny_tokenizer, modules_to_save=["lm_head"])
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf-lora", "--output", tmp_path / "l.gguf")
    assert "modules_to_save" in err and "--format gguf" in err
    assert export("--adapter", adapter, "--format", "gguf", "--output", tmp_path / "merged.gguf") == 0


def test_lora_on_a_tied_output_head_is_refused(tiny_bases, tiny_tokenizer, capsys, tmp_path):
    adapter = make_adapter(tiny_bases["qwen2"], tmp_path / "adapter", tiny_tokenizer, target_modules=["lm_head"])
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf-lora", "--output", tmp_path / "l.gguf")
    assert "ties it to the embeddings" in err and "--format gguf" in err


def test_unknown_pre_tokenizer_is_refused_before_the_merge(adapter, capsys, tmp_path, monkeypatch):
    from lorafit.export import gguf_tokenizer

    monkeypatch.setattr(gguf_tokenizer, "KNOWN_PRE_TOKENIZERS", {})
    monkeypatch.setattr("lorafit.infer.export.load_merged_model", lambda *a, **k: pytest.fail("merged anyway"))
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf", "--output", tmp_path / "m.gguf")
    assert "pre-tokenize" in err and "convert_hf_to_gguf.py" in err


def test_a_file_that_reads_back_wrong_is_deleted(adapter, capsys, tmp_path, monkeypatch):
    from lorafit.export import gguf_file

    real_quantize = gguf_file.gguf.quants.quantize

    def corrupting_quantize(values, qtype):
        return real_quantize(values * 1.01, qtype)  # a writer bug: every value 1% off

    monkeypatch.setattr(gguf_file.gguf.quants, "quantize", corrupting_quantize)
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf-lora", "--output", tmp_path / "l.gguf")
    assert "does not hold what was written" in err and "values off by" in err


def test_ollama_for_an_adapter_needs_a_base_gguf_unless_the_base_has_one(adapter, capsys, tmp_path):
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf-lora", "--ollama",
                        "--output", tmp_path / "l.gguf")
    assert "--ollama_base" in err
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf-lora", "--ollama",
                        "--ollama_base", tmp_path / "missing.gguf", "--output", tmp_path / "l.gguf")
    assert "no such file" in err
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf", "--ollama_base", "qwen2.5:0.5b")
    assert "--ollama_base" in err and "--format gguf-lora --ollama" in err
    assert export("--adapter", adapter, "--format", "gguf-lora", "--ollama", "--ollama_base", "qwen2.5:0.5b",
                  "--output", tmp_path / "l.gguf") == 0
    assert "FROM qwen2.5:0.5b\nADAPTER ./l.gguf\n" in (tmp_path / "Modelfile").read_text()


def test_an_ollama_base_gguf_of_another_shape_is_refused(adapter, tiny_bases, tiny_tokenizer, capsys, tmp_path):
    other = make_adapter(tiny_bases["qwen2"], tmp_path / "qwen-adapter", tiny_tokenizer)
    qwen_gguf = tmp_path / "qwen.gguf"
    assert export("--adapter", other, "--format", "gguf", "--output", qwen_gguf) == 0
    capsys.readouterr()
    err = fails_cleanly(capsys, tmp_path, "--adapter", adapter, "--format", "gguf-lora", "--ollama",
                        "--ollama_base", qwen_gguf, "--output", tmp_path / "l.gguf")
    assert "is a qwen2 model; the adapter is for a llama model" in err
