"""The tokenizer inside a merged GGUF file: enough for llama.cpp to produce the ids transformers does.

Byte-level BPE tokenizers (GPT-2's scheme, used by SmolLM2, Llama 3, Qwen2 and Mistral Nemo) are
written as llama.cpp's converter writes them: `tokenizer.ggml.model = gpt2`, every token in its
byte-level spelling with a type (normal, control for special tokens, user-defined for other added
tokens, unused for ids past the tokenizer), the merges, and `tokenizer.ggml.pre`, the name of the
pre-tokenizer (the regex that splits text before BPE) llama.cpp should use. llama.cpp names
pre-tokenizers by behaviour, not by model: it encodes a fixed text (`PROBE_TEXT`, from its converter)
and looks the hash of the ids up in a table. `KNOWN_PRE_TOKENIZERS` holds the entries of that table
for the families exported here; an unknown hash is an error, since a wrong pre-tokenizer makes
llama.cpp split text differently without saying so.

Special tokens: BOS, UNK and PAD as the tokenizer has them, whether BOS/EOS are added as the tokenizer
actually does it (measured on a one-word text), and the chat template that training used. EOS and
EOT are the template's end-of-turn token (`<|im_end|>` for ChatML), so llama.cpp, Ollama and
LM Studio stop where `lorafit chat` stops.
"""

from __future__ import annotations

import hashlib
import json

import gguf

from lorafit.errors import UserError

# llama.cpp's probe text (convert_hf_to_gguf.py, get_vocab_base_pre): whitespace runs, emoji, digit
# runs, several scripts and English contractions, where pre-tokenizers differ.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256(str(ids of PROBE_TEXT)) -> llama.cpp pre-tokenizer, as in llama.cpp's table (reference models).
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}


class UnsupportedTokenizer(UserError):
    """The tokenizer cannot be written so that llama.cpp reproduces it."""


def probe_hash(tokenizer) -> str:
    return hashlib.sha256(str(tokenizer.encode(PROBE_TEXT)).encode()).hexdigest()


def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizer(f"{type(tokenizer).__name__} has no tokenizer.json (a 'fast' tokenizer); the GGUF "
                                   "export reads the vocabulary and merges from it")
    return json.loads(backend.to_str())


def is_byte_level(spec: dict) -> bool:
    parts = [spec.get("pre_tokenizer") or {}]
    parts += parts[0].get("pretokenizers", []) if parts[0].get("type") == "Sequence" else []
    return spec.get("model", {}).get("type") == "BPE" and any(part.get("type") == "ByteLevel" for part in parts)


def pre_tokenizer_name(tokenizer) -> str:
    digest = probe_hash(tokenizer)
    if digest not in KNOWN_PRE_TOKENIZERS:
        raise UnsupportedTokenizer(
            f"llama.cpp would not know how to pre-tokenize text for this tokenizer (probe hash {digest[:16]}...); "
            f"known here: {', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))}. Export with `lorafit merge` and "
            "convert with llama.cpp's convert_hf_to_gguf.py, whose table may know it")
    return KNOWN_PRE_TOKENIZERS[digest]


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0 .. vocab_size - 1 (the embedding's rows)."""
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UnsupportedTokenizer(f"the tokenizer has ids up to {max(by_id)} but the model's embedding has "
                                   f"{vocab_size} rows (config.vocab_size); resize the embeddings before exporting")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            # llama.cpp takes added tokens as already normalised text, so normalise those the tokenizer
            # does not (as llama.cpp's converter does).
            if not added[token_id].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def merges(spec: dict) -> list[str]:
    """BPE merges as llama.cpp reads them, "left right": a space inside a part (newer tokenizer.json files
    store pairs, which may hold one) is written as U+0120, as gguf's SpecialVocab does."""
    found = spec.get("model", {}).get("merges") or []
    if found and isinstance(found[0], str):
        return list(found)
    return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in found]


def adds_special(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when encoding plain text, as this tokenizer really does."""
    ids = tokenizer("hello")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bos is not None and ids[:1] == [bos], eos is not None and len(ids) > 1 and ids[-1:] == [eos]


def chat_template_text(tokenizer) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def check_tokenizer(tokenizer) -> str:
    """The llama.cpp pre-tokenizer name, or an error for a tokenizer this export cannot write."""
    spec = tokenizer_json(tokenizer)
    if not is_byte_level(spec):
        raise UnsupportedTokenizer(
            f"the tokenizer is a {spec.get('model', {}).get('type')} model without byte-level pre-tokenization "
            "(a SentencePiece-style tokenizer?); the GGUF export writes byte-level BPE tokenizers (SmolLM2, Llama 3, "
            "Qwen2, Mistral Nemo). Use `lorafit merge` and llama.cpp's convert_hf_to_gguf.py for this one")
    return pre_tokenizer_name(tokenizer)


def describe_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, end_of_turn_id: int | None) -> None:
    """Write the tokenizer metadata (vocabulary, merges, special tokens, chat template)."""
    pre_tokenizer = check_tokenizer(tokenizer)
    spec = tokenizer_json(tokenizer)
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(spec))
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    eos = end_of_turn_id if end_of_turn_id is not None else tokenizer.eos_token_id
    if eos is not None:
        writer.add_eos_token_id(eos)
        writer.add_eot_token_id(eos)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    add_bos, add_eos = adds_special(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = chat_template_text(tokenizer)
    if template:
        writer.add_chat_template(template)
