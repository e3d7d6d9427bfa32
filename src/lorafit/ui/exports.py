"""Export buttons: `lorafit merge` (and `lorafit export` to GGUF, where that command exists), run as
child processes (`jobs`) on a run's final adapter, each with its log and state beside the run.

    merge      lorafit merge --adapter RUN --output_dir RUN/merged --overwrite_output_dir
    gguf       lorafit export --adapter RUN --format gguf --overwrite        (RUN/model-f16.gguf)
    gguf-lora  lorafit export --adapter RUN --format gguf-lora --overwrite   (RUN/lora-f32.gguf)
"""

from __future__ import annotations

import shlex
from pathlib import Path

from lorafit.errors import UserError
from lorafit.ui.jobs import Jobs, log_tail, read_state

MERGED_FOLDER = "merged"


def available_exports() -> list[str]:
    from lorafit.cli import COMMANDS

    return ["merge"] + (["gguf", "gguf-lora"] if "export" in COMMANDS else [])


def export_args(kind: str, adapter: Path) -> list[str]:
    if kind == "merge":
        return ["merge", "--adapter", str(adapter), "--output_dir", str(adapter / MERGED_FOLDER),
                "--overwrite_output_dir"]
    if kind in ("gguf", "gguf-lora"):
        return ["export", "--adapter", str(adapter), "--format", kind, "--overwrite"]
    raise UserError(f"unknown export {kind!r}: expected one of {', '.join(available_exports())}")


def _files(run_dir: Path, kind: str) -> tuple[Path, Path]:
    return run_dir / f"ui-export-{kind}.json", run_dir / f"ui-export-{kind}.log"


def start_export(jobs: Jobs, run_dir: Path, kind: str) -> dict:
    if kind not in available_exports():
        raise UserError(f"unknown export {kind!r}: expected one of {', '.join(available_exports())}")
    if not (run_dir / "adapter_config.json").is_file():
        raise UserError(f"{run_dir} has no final adapter yet: finish (or resume) the run first")
    state_path, log_path = _files(run_dir, kind)
    log_path.unlink(missing_ok=True)
    jobs.start(export_args(kind, run_dir), state_path, log_path)
    return describe_export(jobs, run_dir, kind)


def describe_export(jobs: Jobs, run_dir: Path, kind: str) -> dict:
    state_path, log_path = _files(run_dir, kind)
    job = read_state(state_path)
    if job is None:
        return {"kind": kind, "state": "not started"}
    running = jobs.running(state_path)
    code = job.get("exit_code")
    state = "running" if running else "done" if code == 0 else "failed"
    return {"kind": kind, "state": state, "command": shlex.join(["lorafit", *job["args"]]),
            "log_tail": log_tail(log_path, 12)}
