"""examples/train_plain_torch.py runs a few steps on the shared pieces and saves a loadable adapter."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

import lorafit
from lorafit.models import load_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_plain_torch.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_plain_torch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_warmup_then_cosine_schedule(example):
    multipliers = [example.warmup_cosine(step, warmup_steps=2, total_steps=10) for step in range(11)]
    assert multipliers[0] < multipliers[1] < multipliers[2] == 1.0  # linear warm-up, then the peak
    assert all(a >= b for a, b in zip(multipliers[2:], multipliers[3:]))  # cosine decay
    assert multipliers[10] == pytest.approx(0.0, abs=1e-12)
    assert example.warmup_cosine(6, 2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_a_few_steps_lower_the_loss_and_save_an_adapter(example, tmp_path, tiny_model_dir, identity_files):
    train, _ = identity_files
    out = tmp_path / "plain"
    args = example.parse_args([
        "--model_name_or_path", tiny_model_dir, "--train_file", str(train), "--output_dir", str(out),
        "--max_steps", "6", "--batch_size", "4", "--gradient_accumulation_steps", "2",
        "--learning_rate", "1e-2", "--lora_dropout", "0", "--warmup_ratio", "0",
    ])
    example.train(args)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(r["grad_norm"] > 0 for r in records)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == tiny_model_dir
    model = lorafit.load_adapter(load_model(tiny_model_dir), out)
    assert any(layer.lora_B.weight.abs().sum() > 0 for _, layer in lorafit.lora.lora_layers(model))
