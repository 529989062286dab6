"""Read and write safetensors files one tensor at a time.

`safetensors.torch.save_file` needs every tensor of a shard in memory at once, and `safe_open` maps
the whole file, so the pages it touches count towards the process's memory. Merging a 7.8B model on
a lab machine should cost about one tensor of RAM, so this module reads tensors with plain
seek/readinto and writes a shard by laying out its header first (shapes and dtypes are known up
front) and then streaming each tensor's bytes. Files written here are ordinary safetensors files:
the format is an 8-byte little-endian header length, a JSON header with byte offsets, then the raw
little-endian tensor bytes (https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from hai_medqa.errors import HaiMedQAError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_COPY_CHUNK = 16 << 20  # bytes per read when copying a tensor unchanged


class SafetensorsFormatError(HaiMedQAError, ValueError):
    """A file is not a readable safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype name, shape and absolute byte range in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """({name: TensorInfo with absolute byte offsets}, metadata) of a safetensors file, header only.

    Parsing and its checks are the model stage's (`hai_medqa.model.convert.read_safetensors_header`);
    this adds the dtype check the merge needs to decode tensors.
    """
    from hai_medqa.model.convert import read_safetensors_header
    from hai_medqa.model.exaone_layout import ModelLayoutError

    path = Path(path)
    try:
        shard = read_safetensors_header(path)
    except ModelLayoutError as e:
        raise SafetensorsFormatError(str(e)) from None
    return tensor_infos(shard), dict(shard.metadata or {})


def tensor_infos(shard) -> dict[str, TensorInfo]:
    """TensorInfo (absolute offsets, checked dtype and size) for each tensor of a parsed shard
    (`hai_medqa.model.convert.Shard`), in file order."""
    infos: dict[str, TensorInfo] = {}
    for t in shard.tensors:
        if t.dtype not in DTYPES:
            raise SafetensorsFormatError(f"{shard.path}: tensor {t.name!r} has unsupported dtype {t.dtype}")
        info = TensorInfo(Path(shard.path), t.dtype, tuple(t.shape), shard.data_start + t.begin,
                          shard.data_start + t.end)
        if info.nbytes != info.numel * DTYPES[t.dtype].itemsize:
            raise SafetensorsFormatError(f"{shard.path}: byte range of tensor {t.name!r} does not match its shape")
        infos[t.name] = info
    return infos


def read_tensor(info: TensorInfo, f: BinaryIO | None = None) -> torch.Tensor:
    """Read one tensor into fresh memory (no memory map), with its stored dtype and shape."""
    buf = bytearray(info.nbytes)
    if f is None:
        with open(info.file, "rb") as fh:
            fh.seek(info.begin)
            got = fh.readinto(buf)
    else:
        f.seek(info.begin)
        got = f.readinto(buf)
    if got != info.nbytes:
        raise SafetensorsFormatError(f"{info.file}: file ends inside a tensor (truncated download?)")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor a `StreamingShardWriter` will receive: output name, dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


class StreamingShardWriter:
    """Write one safetensors file whose tensors arrive one at a time, in the planned order.

    The header (with every offset) is written first, so only the tensor being written is in memory.
    `close()` checks that every planned tensor arrived; a partial file is the caller's to discard
    (callers write into a temporary folder that only becomes visible when complete).
    """

    def __init__(self, path: str | os.PathLike, plan: Iterable[PlannedTensor], metadata: Mapping[str, str]):
        self.path = Path(path)
        self.plan = list(plan)
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for t in self.plan:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the format pads the header so tensor data starts 8-aligned
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed by close()/__exit__)
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._next = 0

    def _expect(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        if self._next >= len(self.plan):
            raise RuntimeError(f"{self.path.name}: unplanned tensor {name}")
        want = self.plan[self._next]
        if (want.name, want.dtype, want.shape) != (name, dtype, tuple(shape)):
            raise RuntimeError(f"{self.path.name}: expected {want}, got {(name, dtype, tuple(shape))}")
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` (its dtype and shape must match the plan)."""
        self._expect(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))
        if tensor.numel():
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._f.write(memoryview(data))

    def copy_raw(self, name: str, info: TensorInfo, src: BinaryIO) -> None:
        """Append a tensor by copying its bytes from an open source file, never materialising it."""
        self._expect(name, info.dtype, info.shape)
        src.seek(info.begin)
        left = info.nbytes
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise SafetensorsFormatError(f"{info.file}: file ends inside a tensor (truncated download?)")
            self._f.write(chunk)
            left -= len(chunk)

    def close(self) -> None:
        """Flush to disk; raise if a planned tensor never arrived."""
        try:
            if self._next != len(self.plan):
                raise RuntimeError(f"{self.path.name}: {len(self.plan) - self._next} planned tensors missing")
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def __enter__(self) -> StreamingShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
