"""Fixtures for the reliability suite: quick training runs on the tiny model, and one reference run.

Each promise is tested by injecting its fault (a signal, a kill during a save, a NaN loss, a missing
file, a log file instead of a terminal, a user mistake) and checking what the user is promised.
Runs that must end with the uninterrupted adapter compare with `reference_adapter`, trained once
per session with the same arguments (fp32, dropout on, several steps per epoch).
"""

from __future__ import annotations

import importlib.util

import pytest

from reliability_helpers import EXACT_RESUME_ARGS, REPO

# The packaged identity data and quick-run arguments, as the training tests have them (one definition).
_spec = importlib.util.spec_from_file_location("train_conftest", REPO / "tests" / "train" / "conftest.py")
_train_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train_conftest)
identity_files = _train_conftest.identity_files


@pytest.fixture(scope="session")
def run_args(tiny_model_dir, identity_files):
    """The argument list of a few-second run on the tiny model (as tests/train's quick_args)."""
    train, _ = identity_files
    return lambda output_dir, *extra: _train_conftest.quick_run_args(tiny_model_dir, train, output_dir, *extra)


@pytest.fixture(scope="session")
def reference_adapter(run_args, tmp_path_factory):
    """The adapter tensors of an uninterrupted run with EXACT_RESUME_ARGS."""
    from safetensors.torch import load_file

    from lorafit.train import run

    output_dir = tmp_path_factory.mktemp("reference") / "run"
    assert run.main(run_args(output_dir, *EXACT_RESUME_ARGS)) == 0
    return load_file(str(output_dir / "adapter_model.safetensors"))
