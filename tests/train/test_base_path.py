"""The adapter names its base model by an absolute path, whatever form the user gave it in."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorafit.train.run import main


def test_a_relative_model_folder_is_saved_as_an_absolute_path(quick_args, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(tiny_model_dir, tmp_path)
    args = quick_args(tmp_path / "run", "--max_steps", "1")
    args[args.index("--model_name_or_path") + 1] = relative
    assert main(args) == 0
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(saved).is_absolute() and Path(saved) == Path(tiny_model_dir).resolve()
