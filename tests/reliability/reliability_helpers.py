"""Helpers shared by the reliability tests (a uniquely named module, so tests can import it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Dropout on and 8 steps over 15-step epochs: data order, dropout RNG, optimizer moments and the
# schedule all have to be restored for a resumed run to end with the reference adapter.
EXACT_RESUME_ARGS = ("--max_steps", "8", "--learning_rate", "1e-2", "--lora_dropout", "0.1", "--seed", "7")


def assert_same_adapter(folder: Path, expected: dict) -> None:
    import torch
    from safetensors.torch import load_file

    actual = load_file(str(Path(folder) / "adapter_model.safetensors"))
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)


def lorafit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorafit", *args]


def subprocess_env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), **extra}
