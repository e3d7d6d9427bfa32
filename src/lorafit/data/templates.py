"""Chat templates: every conversation is rendered by a Jinja template installed on the tokenizer.

There is one rendering path. `set_chat_template` installs the template chosen by `--template` as
``tokenizer.chat_template``; from then on training, `lorafit data inspect`, `chat`, `generate` and
`serve` all render through ``tokenizer.apply_chat_template``, and ``tokenizer.save_pretrained``
carries the exact template used in training into the adapter folder and merged exports. Training
and inference therefore cannot drift apart.

Named templates:

* ``auto``: the tokenizer's own template (falls back to ``default`` with a warning when it has none);
* ``default``: the ``run_clm`` recipe's plain style, prompt then response, with a newline after
  each prompt part (system, user, tool) and EOS closing each response;
* ``alpaca`` (alias ``standard_alpaca``): the Stanford Alpaca prompt ("Below is an instruction...",
  ``### Instruction:`` / ``### Response:``), EOS closing each response;
* ``chatml``: ``<|im_start|>role\\n...<|im_end|>\\n`` with no default system prompt;
* a path to a ``.jinja`` file.

Our templates never emit BOS: `render.encode_text` adds it exactly when the tokenizer itself would,
so no template can double it. Each assistant header ends in a single newline so that the rendered
prompt is a token prefix of the whole conversation under byte-level BPE (a prompt ending in a space
or in two newlines would merge with the reply's first token; ``run_clm``'s ``"### Response: "``
had that trap).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorafit.data.errors import DataConfigError

logger = logging.getLogger(__name__)

# Each prompt part is written as rstrip() + "\n" and empty parts not at all, so the text before a
# reply always ends in one newline after a visible character (or in EOS, or is empty): no whitespace
# run there can merge with the reply's first token.
DEFAULT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ message['content'] + eos_token }}"
    "{%- elif message['content'].rstrip() -%}"
    "{{ message['content'].rstrip() + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'].rstrip() + '\n\n' }}"
    "{%- else -%}"
    "{{ '" + ALPACA_SYSTEM + "\n\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not loop.first and loop.previtem['role'] == 'assistant' -%}{{ '\n\n' }}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '### Instruction:\n' + message['content'].rstrip() + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Response:\n' + message['content'] + eos_token }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ '### Tool result:\n' + message['content'].rstrip() + '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages and messages[-1]['role'] == 'assistant' -%}{{ '\n\n' }}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\n' }}{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\n\n' }}{%- endif -%}"
    "{{ '# Tools\nYou may call these functions:\n' + (tools | tojson) + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (tools and loop.first and message['role'] == 'system') -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

NAMED_TEMPLATES = {"default": DEFAULT_TEMPLATE, "alpaca": ALPACA_TEMPLATE, "chatml": CHATML_TEMPLATE}
# The run_clm recipe's --prompt_type values, and other spellings people use.
TEMPLATE_ALIASES = {"standard_alpaca": "alpaca"}
TEMPLATE_CHOICES = ("auto", *NAMED_TEMPLATES, *TEMPLATE_ALIASES, "<path/to/template.jinja>")

# A reply no template will rewrite, used to find what closes an assistant turn.
_PROBE_REPLY = "lorafit probe reply"


def resolve_template(template: str | None) -> str | None:
    """`--template` value -> Jinja source (None for ``auto``). Unknown names are a user error."""
    name = (template or "auto").strip()
    if name == "auto":
        return None
    name = TEMPLATE_ALIASES.get(name, name)
    if name in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name]
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise DataConfigError(
        f"--template {template!r}: not a known template and not a file; "
        f"expected one of {', '.join(TEMPLATE_CHOICES)}"
    )


def set_chat_template(tokenizer, template: str = "auto"):
    """Install the `--template` choice as ``tokenizer.chat_template`` (in place) and return the tokenizer."""
    source = resolve_template(template)
    if source is None:
        if not tokenizer.chat_template:
            logger.warning("the tokenizer has no chat template: using lorafit's 'default' template")
            tokenizer.chat_template = DEFAULT_TEMPLATE
        return tokenizer
    tokenizer.chat_template = source
    if template == "chatml" and tokenizer.convert_tokens_to_ids("<|im_end|>") in (None, tokenizer.unk_token_id):
        logger.warning(
            "--template chatml: <|im_end|> is not a token of this tokenizer, so the model learns to "
            "stop by spelling it out; prefer a template built on the tokenizer's own special tokens"
        )
    return tokenizer


def template_name(template: str | None, prompt_type: str | None = None) -> str:
    """The template a run uses: an explicit --template wins over the recipe's --prompt_type."""
    if template and template != "auto":
        return template
    if prompt_type:
        return TEMPLATE_ALIASES.get(prompt_type, prompt_type)
    return "auto"


def end_of_turn_token_ids(tokenizer) -> list[int]:
    """Token ids that close an assistant turn under the current template, plus EOS.

    The template is asked directly: render a probe reply and take the first token after it when it is
    a special (added) token, e.g. ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>`` or ``</s>``.
    Generation uses these as stop tokens; rendering labels them so the model learns to stop.
    """
    ids = []
    after_reply = _text_after_probe_reply(tokenizer)
    if after_reply:
        first = tokenizer(after_reply, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in _added_token_ids(tokenizer):
            ids.append(first[0])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _text_after_probe_reply(tokenizer) -> str:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as error:  # a template that refuses the probe still has EOS as a stop token
        logger.warning("could not probe the chat template for its end-of-turn token: %s", error)
        return ""
    position = text.rfind(_PROBE_REPLY)
    return text[position + len(_PROBE_REPLY):] if position >= 0 else ""


def _added_token_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
