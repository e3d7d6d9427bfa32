"""The Modelfile: ChatML templates become Ollama's TEMPLATE (+ SYSTEM for a default system prompt)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess

import pytest

from export_helpers import export, make_adapter
from lorafit.data.templates import set_chat_template
from lorafit.export.ollama import CHATML_TEMPLATE, build_modelfile, chatml_default_system


def with_template(tokenizer, name):
    return set_chat_template(copy.deepcopy(tokenizer), name)


def test_smollm2_template_is_chatml_with_a_default_system_prompt(smol_tokenizer):
    assert chatml_default_system(smol_tokenizer) == (
        True, "You are a helpful AI assistant named SmolLM, trained by Hugging Face")


def test_lorafits_chatml_has_no_default_system_and_other_templates_are_not_chatml(tiny_tokenizer):
    assert chatml_default_system(with_template(tiny_tokenizer, "chatml")) == (True, None)
    assert chatml_default_system(with_template(tiny_tokenizer, "alpaca")) == (False, None)
    assert chatml_default_system(with_template(tiny_tokenizer, "default")) == (False, None)


def test_modelfile_for_chatml_and_for_other_templates(smol_tokenizer, tiny_tokenizer):
    im_end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = build_modelfile("./model.gguf", None, smol_tokenizer, [im_end, im_end]).text()
    assert text.splitlines()[1:3] == ["FROM ./model.gguf", f'TEMPLATE """{CHATML_TEMPLATE.splitlines()[0]}']
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.count("PARAMETER stop") == 1 and 'PARAMETER stop "<|im_end|>"' in text

    alpaca = with_template(tiny_tokenizer, "alpaca")
    modelfile = build_modelfile("/models/base.gguf", "./lora.gguf", alpaca, [alpaca.eos_token_id])
    assert modelfile.template is None and modelfile.notes and "not ChatML" in modelfile.notes[0]
    assert "FROM /models/base.gguf\nADAPTER ./lora.gguf\nPARAMETER stop \"<|im_end|>\"\n" in modelfile.text()


GO_RENDERER = """package main

import (
\t"encoding/json"
\t"os"
\t"text/template"
)

type Message struct{ Role, Content string }

func main() {
\tsource, _ := os.ReadFile(os.Args[1])
\tvar conversations [][]Message
\tdata, _ := os.ReadFile(os.Args[2])
\tjson.Unmarshal(data, &conversations)
\ttmpl := template.Must(template.New("chat").Parse(string(source)))
\tvar rendered []string
\tfor _, messages := range conversations {
\t\tvar out stringWriter
\t\tif err := tmpl.Execute(&out, map[string]any{"Messages": messages}); err != nil {
\t\t\tpanic(err)
\t\t}
\t\trendered = append(rendered, string(out))
\t}
\tjson.NewEncoder(os.Stdout).Encode(rendered)
}

type stringWriter string

func (w *stringWriter) Write(p []byte) (int, error) { *w += stringWriter(p); return len(p), nil }
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (Ollama's template language is Go's text/template)")
def test_chatml_template_renders_in_go_as_the_jinja_template_does(smol_tokenizer, tmp_path):
    """Ollama's TEMPLATE is a Go text/template: render it with Go's own package and compare with Jinja."""
    conversations = [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!\nTwo lines."}],
    ]
    (tmp_path / "render.go").write_text(GO_RENDERER)
    (tmp_path / "template.txt").write_text(CHATML_TEMPLATE)
    (tmp_path / "conversations.json").write_text(json.dumps([[{"Role": m["role"], "Content": m["content"]} for m in c]
                                                             for c in conversations]))
    done = subprocess.run(["go", "run", "render.go", "template.txt", "conversations.json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "GO111MODULE": "off"})
    assert done.returncode == 0, done.stderr
    expected = [smol_tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                for c in conversations]
    assert json.loads(done.stdout) == expected


def test_merged_export_writes_a_modelfile_from_the_gguf_beside_it(tiny_bases, tiny_tokenizer, tmp_path, capsys):
    adapter = make_adapter(tiny_bases["llama"], tmp_path / "adapter", tiny_tokenizer)
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", "q8_0", "--ollama") == 0
    assert (adapter / "model-q8_0.gguf").is_file()
    modelfile = (adapter / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf\n" in modelfile and "ADAPTER" not in modelfile
    assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert f"ollama create NAME -f {adapter / 'Modelfile'}" in capsys.readouterr().err
