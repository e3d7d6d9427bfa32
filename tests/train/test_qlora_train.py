"""`lorafit train --quantization_bit 4|8` end to end on the tiny model: it learns, its adapter is an
ordinary PEFT adapter, and inference applies it over the same quantized base."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lorafit
from lorafit.errors import UserError
from lorafit.infer.loading import load_for_inference
from lorafit.models import load_model
from lorafit.quant import QuantizationSpec
from lorafit.train import run

pytest.importorskip("bitsandbytes", reason="QLoRA tests need the qlora extra (bitsandbytes)")


def losses(output_dir):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("loss") is not None]



@pytest.fixture(scope="session")
def tiny_model_dir(wide_tiny_model_dir):
    """These tests load the base 4-bit for inference: the 64-wide tiny model (tests/conftest.py)."""
    return wide_tiny_model_dir

@pytest.mark.parametrize("extra", [["--quantization_bit", "4"],
                                   ["--quantization_bit", "8"],
                                   ["--quantization_bit", "4", "--quant_type", "fp4", "--packing", "true",
                                    "--gradient_checkpointing", "true"]])
def test_qlora_run_learns_and_saves_a_peft_adapter(tmp_path, quick_args, tiny_model_dir, extra):
    from peft import PeftModel

    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run.main(quick_args(out, "--learning_rate", "2e-2", "--max_steps", "8", *extra)) == 0
    logged = losses(out)
    assert sum(logged[-3:]) < sum(logged[:3])  # learns: one batch's loss alone moves more than a few steps
    assert (out / "adapter_model.safetensors").is_file()

    spec = QuantizationSpec.from_flags(int(extra[1]), *(["fp4"] if "fp4" in extra else []))
    ids = torch.tensor([[1, 5, 9, 12, 40, 2]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_for_inference(tiny_model_dir, str(out), quantization=spec).model
        theirs = PeftModel.from_pretrained(load_model(tiny_model_dir, quantization=spec), out).eval()
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        base = load_model(tiny_model_dir, quantization=spec).eval()
        assert not torch.allclose(ours(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)


def test_qlora_is_refused_for_full_fine_tuning(tmp_path, quick_args):
    with pytest.raises(UserError, match="use_peft false"):
        run.main(quick_args(tmp_path / "run", "--quantization_bit", "4", "--use_peft", "false"))


def test_quant_flags_without_the_bit_are_refused(tmp_path, quick_args):
    with pytest.raises(UserError, match="--quantization_bit"):
        run.main(quick_args(tmp_path / "run", "--quant_type", "nf4"))


def test_lorafit_merge_merges_into_the_full_precision_base_and_says_so(tmp_path, quick_args, tiny_model_dir,
                                                                        capsys):
    from lorafit.infer import export

    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run.main(quick_args(out, "--quantization_bit", "4", "--learning_rate", "2e-2")) == 0
    capsys.readouterr()
    assert export.main(["--adapter", str(out), "--output_dir", str(tmp_path / "merged")]) == 0
    assert "trained on a 4-bit quantized base; it is merged into the full-precision base" in capsys.readouterr().err
    merged = load_model(str(tmp_path / "merged"))
    assert all(p.dtype.is_floating_point for p in merged.parameters())
    expected = lorafit.load_adapter(load_model(tiny_model_dir), out).eval()
    ids = torch.tensor([[1, 5, 9, 12, 40, 2]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-4)
