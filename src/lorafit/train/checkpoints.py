"""Saves a crash cannot leave half-written, and the check that a checkpoint is whole before resuming.

Every checkpoint and the final adapter are written into a staging folder, `<output_dir>/.incomplete/`,
and renamed into place once complete. A rename inside one filesystem is atomic, so a run killed at
any instant leaves either the previous state or the new, complete one: `checkpoint-N/` exists only
when all its files do. Staging sits inside the output folder so the rename never crosses
filesystems; what a killed run left there is cleared by the next save.

Checkpoints written by other means (an older lorafit, a copy cut short, a file deleted by hand) are
checked by `checkpoint_problems` before `--resume_from_checkpoint` uses them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from lorafit.errors import TrainingStopped

STAGING_DIR = ".incomplete"
TRAINER_STATE = "trainer_state.json"
# Published last: their presence is what says "a run finished here" (see run.RUN_MARKERS).
MARKER_FILES = ("adapter_config.json", "config.json")


@contextlib.contextmanager
def storage_errors(target: Path):
    """A failed write (disk full, permission denied, ...) as one line naming the path; what was
    already in place is untouched, since nothing is renamed before the write completes."""
    try:
        yield
    except OSError as error:
        where = f" ({error.filename})" if error.filename and str(error.filename) != str(target) else ""
        raise TrainingStopped(f"could not write {target}: {error.strerror or error}{where}; the checkpoints "
                              "already saved are untouched: fix the cause (free space, permissions) and rerun "
                              "with --resume_from_checkpoint auto", exit_code=1) from error


def staging_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / STAGING_DIR


def fresh_staging_folder(output_dir: str | Path, name: str) -> Path:
    """An empty `<output_dir>/.incomplete/<name>/`, clearing what an interrupted save left there."""
    folder = staging_root(output_dir) / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder


def _fsync_tree(folder: Path) -> None:
    # The rename is atomic for a killed process; flushing first makes it hold after a power cut too.
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some systems (Windows) cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def publish_folder(staged: Path, target: Path) -> None:
    """Rename the complete folder `staged` to `target`, replacing a folder of the same name."""
    _fsync_tree(staged)
    replaced = None
    if target.exists():  # the same step saved twice: move the old copy aside, never delete it first
        replaced = staged.with_name("replaced-" + staged.name)  # not checkpoint-*: rotation must not see it
        if replaced.exists():
            shutil.rmtree(replaced)
        os.replace(target, replaced)
    os.replace(staged, target)
    _fsync_dir(target.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    _remove_if_empty(staged.parent)


def publish_files(staged: Path, target: Path) -> None:
    """Move each file of `staged` into the existing folder `target` (one atomic rename per file),
    the marker files last, so a marker is never seen beside a missing or older weights file."""
    _fsync_tree(staged)
    target.mkdir(parents=True, exist_ok=True)
    entries = sorted(staged.iterdir(), key=lambda path: (path.name in MARKER_FILES, path.name))
    for entry in entries:
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    _fsync_dir(target)
    staged.rmdir()
    _remove_if_empty(staged.parent)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another save in progress or left over), or already gone
        pass


def rotate_checkpoints(run_dir: Path, save_total_limit: int | None, best: str | None) -> None:
    """The Trainer's rotation (keep the newest `save_total_limit`, the newest and the best always),
    except that a checkpoint is first renamed into staging and then deleted: a kill during the
    deletion leaves files under `.incomplete/`, never a `checkpoint-N` with some of them gone."""
    from transformers.trainer_utils import sort_checkpoints

    if not save_total_limit or save_total_limit <= 0:
        return
    checkpoints = sort_checkpoints(str(run_dir), use_mtime=True)
    protected = {checkpoints[-1]} | ({str(Path(best))} if best else set()) if checkpoints else set()
    excess = len(checkpoints) - max(save_total_limit, len(protected))
    for checkpoint in [c for c in checkpoints if c not in protected][:max(excess, 0)]:
        doomed = fresh_staging_folder(run_dir, "deleted-" + Path(checkpoint).name)
        os.replace(checkpoint, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    _remove_if_empty(staging_root(run_dir))


def _readable_safetensors(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            file.keys()
    except Exception as error:  # noqa: BLE001 - any failure means "do not resume from this"
        return f"{path.name} is not readable ({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__})"
    return None


def checkpoint_problems(folder: Path, expect_optimizer: bool = True) -> list[str]:
    """What keeps `folder` from being a whole checkpoint (an empty list when it is one).

    `expect_optimizer` is False for `--save_only_model` and DeepSpeed, whose optimizer state is
    absent or stored in DeepSpeed's own layout.
    """
    problems = []
    state = folder / TRAINER_STATE
    if not state.is_file():
        problems.append(f"{TRAINER_STATE} is missing")
    else:
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            problems.append(f"{TRAINER_STATE} is not valid JSON")
    weights = sorted(folder.glob("adapter_model.*")) or sorted(folder.glob("model*.safetensors")) or sorted(
        folder.glob("pytorch_model*.bin"))
    if not weights:
        problems.append("no adapter or model weights")
    problems += [problem for path in weights if path.suffix == ".safetensors"
                 for problem in [_readable_safetensors(path)] if problem]
    if any(path.name.startswith("adapter_model") for path in weights) and not (folder / "adapter_config.json").is_file():
        problems.append("adapter_config.json is missing")
    if expect_optimizer:
        for pattern, name in (("optimizer*", "optimizer.pt"), ("scheduler*", "scheduler.pt"),
                              ("rng_state*", "rng_state.pth")):
            if not any(folder.glob(pattern)):
                problems.append(f"{name} is missing")
    return problems
