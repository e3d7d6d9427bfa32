"""Writing one GGUF file: storage types, an atomic write, and a read-back check before the rename.

`--outtype` sets the type of the 2-D tensors (weights, LoRA A and B): f32, f16, bf16, or q8_0 (blocks of
32 values sharing one f16 scale); every conversion is `gguf.quants.quantize`, llama.cpp's own code for
it. As in llama.cpp's converter, 1-D tensors and norms stay f32 (llama.cpp's kernels expect it), and a
q8_0 tensor whose rows are not a whole number of blocks (LoRA B with r < 32, for one) is stored as f16.

The file is written under a temporary name in the destination folder, read back with
`gguf.GGUFReader` (every tensor's name, shape and type, its values dequantised and compared with
what was meant within the storage type's tolerance, the metadata keys), and only then renamed into
place: a failure at any point leaves no file, partial or otherwise, behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from lorafit.errors import UserError
from lorafit.infer.staging import current_umask

Q = gguf.GGMLQuantizationType
OUTTYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Largest |stored - meant| allowed, as a fraction of the tensor's largest |value|: half a unit in the last
# place of f16 (11-bit significand) and bf16 (8-bit); for q8_0, half a step of amax/127 plus the f16
# rounding of the block scale, about 1/254 + 1/2048 of the block's largest value.
RELATIVE_TOLERANCE = {Q.F32: 0.0, Q.F16: 2.0 ** -11, Q.BF16: 2.0 ** -8, Q.Q8_0: 1 / 200}
# f16 below 2^-14 is subnormal, with a fixed step of 2^-24: tiny values are off by up to half of it.
ABSOLUTE_TOLERANCE = {Q.F32: 0.0, Q.F16: 2.0 ** -25, Q.BF16: 0.0, Q.Q8_0: 2.0 ** -25}


def parse_outtype(outtype: str) -> tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]:
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype}: expected one of {', '.join(OUTTYPES)} (smaller types such as "
                        "q4_k_m: run llama.cpp's llama-quantize on the f16 or f32 file)")
    return OUTTYPES[outtype]


def storage_type(name: str, values: np.ndarray, wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if values.ndim <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    if wanted in gguf.GGML_QUANT_SIZES and wanted not in (Q.F32, Q.F16, Q.BF16):
        block_size, _ = gguf.GGML_QUANT_SIZES[wanted]
        if values.shape[-1] % block_size:
            return Q.F16
    return wanted


@dataclass
class PlannedFile:
    """What one GGUF file should hold: its metadata (written by `describe`) and its tensors (float32,
    in PyTorch's row-major layout; GGUF lists the same shape reversed)."""

    architecture: str  # general.architecture
    describe: Callable[[gguf.GGUFWriter], None]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    types: dict[str, gguf.GGMLQuantizationType] = field(default_factory=dict)
    expected_metadata: dict[str, object] = field(default_factory=dict)  # key -> value (None: present)

    def add(self, name: str, values: np.ndarray, wanted: gguf.GGMLQuantizationType) -> None:
        if name in self.tensors:
            raise ValueError(f"two tensors map to {name}")
        values = np.ascontiguousarray(values, dtype=np.float32)
        self.tensors[name] = values
        self.types[name] = storage_type(name, values, wanted)

    def type_counts(self) -> str:
        counts: dict[str, int] = {}
        for qtype in self.types.values():
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        return ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))


def check_output_path(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that cannot be written or would be replaced unasked."""
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name such as {output / 'model.gguf'}")
    if output.exists() and not overwrite:
        raise UserError(f"--output {output} exists: pass --overwrite to replace it")
    blocking = next((folder for folder in reversed(output.parents) if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        raise UserError(f"--output {output}: cannot write there, {blocking} is a file, not a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe_fd, probe_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".probe", dir=output.parent)
    except OSError as error:
        raise UserError(f"--output {output}: cannot write in {output.parent} ({error.strerror or error})") from None
    os.close(probe_fd)
    os.unlink(probe_name)


def write_checked(plan: PlannedFile, output: Path, log=print) -> Path:
    """Write `plan` to a temporary file beside `output`, check it on read-back, rename it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    os.close(descriptor)
    staging = Path(staging_name)
    try:
        writer = gguf.GGUFWriter(staging, plan.architecture)
        plan.describe(writer)
        for name, values in plan.tensors.items():
            qtype = plan.types[name]
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        worst = check_file(staging, plan)
        log(f"read-back check: {len(plan.tensors)} tensors ({plan.type_counts()}), names, shapes and metadata as "
            f"written; largest value error {worst:.2e} of the tensor's range: OK")
        staging.chmod(0o666 & ~current_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(staging, output)
    except OSError as error:
        raise UserError(f"--output {output}: writing failed ({error.strerror or error}); nothing was written") from None
    finally:
        staging.unlink(missing_ok=True)
    return output


class ReadBackError(UserError):
    """The written file does not hold what was meant; it was deleted."""


def check_file(path: Path, plan: PlannedFile) -> float:
    """Read `path` back and compare it with `plan`; returns the largest relative value error found."""
    reader = gguf.GGUFReader(path)
    problems = []
    for key, value in plan.expected_metadata.items():
        found = reader.fields.get(key)
        if found is None:
            problems.append(f"metadata {key} missing")
        elif value is not None and found.contents() != value:
            problems.append(f"metadata {key} is {found.contents()!r}, expected {value!r}")
    stored = {tensor.name: tensor for tensor in reader.tensors}
    if set(stored) != set(plan.tensors):
        problems.append(f"tensors differ: missing {sorted(set(plan.tensors) - set(stored))[:5]}, "
                        f"unexpected {sorted(set(stored) - set(plan.tensors))[:5]}")
    worst = 0.0
    for name in set(stored) & set(plan.tensors):
        tensor, meant, qtype = stored[name], plan.tensors[name], plan.types[name]
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if shape != meant.shape or tensor.tensor_type != qtype:
            problems.append(f"{name}: {tensor.tensor_type.name} {shape}, expected {qtype.name} {meant.shape}")
            continue
        values = gguf.quants.dequantize(tensor.data, qtype).reshape(meant.shape)
        scale = float(np.abs(meant).max(initial=0.0))
        error = float(np.abs(values - meant).max(initial=0.0))
        if not error <= RELATIVE_TOLERANCE[qtype] * scale + ABSOLUTE_TOLERANCE[qtype]:  # also catches NaN
            problems.append(f"{name}: values off by {error:.3g} (largest |value| {scale:.3g}, {qtype.name})")
        worst = max(worst, error / scale if scale else 0.0)
    if problems:
        raise ReadBackError("the GGUF file read back does not hold what was written (nothing was kept): "
                            + "; ".join(problems[:10]))
    return worst

