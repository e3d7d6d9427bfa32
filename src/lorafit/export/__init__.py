"""Files for other runtimes: `lorafit export` writes GGUF for llama.cpp, Ollama and LM Studio.

    architectures.py   which Hugging Face models llama.cpp can run, and its tensor names for them
    gguf_file.py       tensor storage types (f32, f16, bf16, q8_0), the atomic write and the read-back check
    gguf_lora.py       an adapter as a GGUF LoRA file (`llama-cli --lora`, Ollama's ADAPTER)
    gguf_model.py      the merged model as one GGUF file (weights and hyper-parameters)
    gguf_tokenizer.py  the tokenizer inside that file (vocabulary, merges, special tokens, chat template)
    ollama.py          the Modelfile, with the chat template translated to Ollama's TEMPLATE
    command.py         `lorafit export`
"""
