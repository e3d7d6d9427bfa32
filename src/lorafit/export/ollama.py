"""An Ollama Modelfile beside the exported GGUF: `ollama create NAME -f Modelfile`.

    FROM ./model-f16.gguf                 (merged export; or the base GGUF, then ADAPTER ./lora-f32.gguf)
    TEMPLATE \"\"\"...\"\"\"                  the chat template, in Ollama's Go template language
    SYSTEM \"\"\"...\"\"\"                    the template's default system prompt, when it has one
    PARAMETER stop "<|im_end|>"           the end-of-turn token(s)

Hugging Face chat templates are Jinja programs; Ollama's are Go templates, and no general translation
exists. ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`, SmolLM2's and Qwen2's format) is recognised
by what the template renders, not by its source text: a probe conversation is rendered and compared
with ChatML's exact text, with and without a system message. A default system prompt (SmolLM2 adds
one when the conversation has none) becomes SYSTEM, which Ollama inserts as the first message when a
request brings none. Any other template gets no TEMPLATE line and a note: Ollama then picks a template
by matching the GGUF's own `tokenizer.chat_template` against the ones it knows.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MODELFILE = "Modelfile"
# Ollama's Go template for ChatML: every message closed by <|im_end|>, then the assistant header when
# the last message is not the assistant's (a last assistant message stays open, to be continued).
CHATML_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|im_start|>{{ .Role }}\n"
    "{{ .Content }}{{ if or (not $last) (ne .Role \"assistant\") }}<|im_end|>\n"
    "{{ end }}\n"
    "{{- if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n"
    "{{ end }}\n"
    "{{- end }}"
)
_SYSTEM, _USER, _ASSISTANT, _NEXT = "lorafit-system-text", "lorafit-user-text", "lorafit-reply-text", "lorafit-next"


@dataclass
class Modelfile:
    base: str  # FROM: a GGUF path or an Ollama model name
    adapter: str | None = None  # ADAPTER: a GGUF LoRA path
    template: str | None = None
    system: str | None = None
    stops: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said on stderr and kept as comments

    def text(self) -> str:
        lines = ["# Written by `lorafit export`. Create the model with: ollama create NAME -f Modelfile"]
        lines += [f"# {note}" for note in self.notes]
        lines.append(f"FROM {self.base}")
        if self.adapter:
            lines.append(f"ADAPTER {self.adapter}")
        if self.template:
            lines.append(f'TEMPLATE """{self.template}"""')
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f"PARAMETER stop {quote(stop)}" for stop in self.stops]
        return "\n".join(lines) + "\n"


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def chatml(system: str | None, turns: list[tuple[str, str]], open_assistant: bool = True) -> str:
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in [("system", system)] + turns
                   if not (role == "system" and content is None))
    return text + ("<|im_start|>assistant\n" if open_assistant else "")


def _render(tokenizer, messages: list[dict]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses the probe is simply not ChatML
        return None


def _candidates(text: str | None, tokenizer) -> list[str]:
    """The rendered text, and without a leading BOS when it has one (BOS comes from the tokenizer settings
    in llama.cpp and Ollama, not from TEMPLATE). SmolLM2's BOS is <|im_start|> itself, so both are tried."""
    if text is None:
        return []
    bos = tokenizer.bos_token
    return [text, text[len(bos):]] if bos and text.startswith(bos) else [text]


def chatml_default_system(tokenizer) -> tuple[bool, str | None]:
    """(is the chat template ChatML?, the system prompt it adds when a conversation has none)."""
    turns = [("user", _USER), ("assistant", _ASSISTANT), ("user", _NEXT)]
    messages = [{"role": role, "content": text} for role, text in turns]
    with_system = _render(tokenizer, [{"role": "system", "content": _SYSTEM}] + messages)
    if chatml(_SYSTEM, turns) not in _candidates(with_system, tokenizer):
        return False, None
    prefix, tail = "<|im_start|>system\n", "<|im_end|>\n" + chatml(None, turns)
    for without in _candidates(_render(tokenizer, messages), tokenizer):
        if without == chatml(None, turns):
            return True, None
        if without.startswith(prefix) and without.endswith(tail) and len(without) >= len(prefix) + len(tail):
            return True, without[len(prefix):len(without) - len(tail)]
    return False, None


def build_modelfile(base: str, adapter: str | None, tokenizer, stop_token_ids: list[int]) -> Modelfile:
    modelfile = Modelfile(base=base, adapter=adapter)
    is_chatml, system = chatml_default_system(tokenizer)
    if is_chatml:
        modelfile.template, modelfile.system = CHATML_TEMPLATE, system
    else:
        modelfile.notes.append(
            "The chat template is not ChatML, which is the format lorafit translates to Ollama's TEMPLATE; "
            "without one, Ollama picks a template matching the GGUF's tokenizer.chat_template. If answers look "
            "wrong, write TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md).")
    for token in tokenizer.convert_ids_to_tokens(stop_token_ids):
        if token and token not in modelfile.stops:
            modelfile.stops.append(token)
    return modelfile


def modelfile_path(reference: Path, folder: Path) -> str:
    """How the Modelfile in `folder` names a file: ./name beside it or below, else the absolute path."""
    reference = reference.resolve()
    try:
        return "./" + reference.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(reference)


def write_modelfile(modelfile: Modelfile, folder: Path) -> Path:
    path = folder / MODELFILE
    descriptor, staging = tempfile.mkstemp(prefix=f".{MODELFILE}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(modelfile.text())
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)
    return path
