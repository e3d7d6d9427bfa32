"""Writing a result folder whole or not at all: built beside its destination, moved into place last."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lorafit.errors import UserError


def check_output_folder(output: Path, overwrite: bool) -> None:
    """`--output_dir` must be a folder that is new, empty, or allowed to be replaced."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output_dir {output} is a file, not a folder")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {output} is not empty: pass --overwrite_output_dir to replace it")


@contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """A fresh folder beside `output`; when the block ends without an error it replaces `output`,
    otherwise it is removed and `output` is left as it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result should be an ordinary folder
    try:
        yield staging
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    current = os.umask(0)
    os.umask(current)
    return current
