"""Safetensors files, one tensor at a time: a checked lazy reader and a streaming writer.

Reading goes through safetensors' own lazy `safe_open` (bfloat16 arrives as an
`ml_dtypes.bfloat16` numpy array). Each read opens the file, copies the tensor (or a block of
its rows) out and closes it again, so the memory map never keeps the whole checkpoint resident.

The safetensors package can only write a file from a dict of complete tensors held in memory;
`write_safetensors` writes the same format (8-byte little-endian header length, JSON header,
then the raw tensors back to back) while asking for one tensor, or one block of rows, at a time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
FLOAT_DTYPES = {code: name for name, code in _DTYPE_CODES.items()}  # "BF16" -> "bfloat16"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt, or does not match its config."""


def dtype_code(dtype) -> str:
    """The safetensors dtype code ("F32", "BF16", ...) of a numpy/Keras dtype."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPE_CODES:
        raise ValueError(f"dtype {name!r} cannot be written; choose one of {sorted(_DTYPE_CODES)}")
    return _DTYPE_CODES[name]


def shard_name(index: int, total: int) -> str:
    """transformers' shard file name: model-00001-of-00003.safetensors."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


# ---------------------------------------------------------------------------- reading
class SafetensorsCheckpoint:
    """Every tensor of a checkpoint directory, its file, shape and dtype; read on demand.

    The directory holds `model.safetensors.index.json` plus the shards it names, or
    `model.safetensors` (or any `*.safetensors` files). Opening checks every file's header,
    that the file is as long as the header says, and that the index agrees with the files;
    errors name the file.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            paths = sorted({self.directory / f for f in weight_map.values()})
            for path in paths:
                if not path.exists():
                    raise CheckpointError(f"{index} names {path.name}, which does not exist")
        else:
            weight_map = None
            paths = sorted(self.directory.glob("*.safetensors"))
            if not paths:
                raise CheckpointError(
                    f"{self.directory}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors files"
                )
        for path in paths:
            for name, (shape, dtype) in _read_header(path).items():
                if name in self.files:
                    raise CheckpointError(
                        f"{path}: tensor {name} is also in {self.files[name].name}"
                    )
                self.files[name], self.shapes[name], self.dtypes[name] = path, shape, dtype
        if weight_map is not None:
            for name, fname in weight_map.items():
                if self.files.get(name, Path()).name != fname:
                    raise CheckpointError(f"{index} puts {name} in {fname}, but it is not there")

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def float_dtype(self, name: str) -> str | None:
        """"float32", "bfloat16" or "float16" for a float tensor, else None."""
        return FLOAT_DTYPES.get(self.dtypes[name])

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shapes[name], dtype=np.int64)) * _ITEMSIZE[self.dtypes[name]]

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor `name` (or the block `rows` of its first axis) as a numpy array."""
        path = self.files[name]
        try:
            with safe_open(str(path), framework="numpy") as f:
                if rows is None:
                    return f.get_tensor(name)
                return f.get_slice(name)[rows]
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}


def _read_header(path: Path) -> dict[str, tuple[tuple, str]]:
    """{name: (shape, dtype code)} of one file. safetensors checks the header and that the
    file holds all the bytes it promises (a truncated file fails here)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


# ---------------------------------------------------------------------------- writing
class TensorEntry(NamedTuple):
    """A tensor to write: name, shape, dtype, and a callable yielding its rows in blocks."""

    name: str
    shape: tuple
    dtype: str  # "float32", "bfloat16", "float16"
    blocks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[dtype_code(self.dtype)]


def write_safetensors(path, entries: list[TensorEntry], metadata=None, on_tensor=None):
    """Write `entries` to the safetensors file `path`, one block of rows at a time.

    `on_tensor(entry)` is called after each tensor is written (progress bars).
    """
    header = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": dtype_code(e.dtype), "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            written = 0
            for block in e.blocks():
                block = np.ascontiguousarray(block, dtype=numpy_dtype(e.dtype))
                f.write(memoryview(block.reshape(-1).view(np.uint8)))
                written += block.nbytes
            if written != e.nbytes:
                raise ValueError(f"{e.name}: wrote {written} bytes, expected {e.nbytes}")
            if on_tensor is not None:
                on_tensor(e)


def numpy_dtype(name: str):
    """The NumPy dtype of a dtype name ("bfloat16" is `ml_dtypes.bfloat16`)."""
    if name == "bfloat16":
        return ml_dtypes.bfloat16
    return np.dtype(name)


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Split `entries` in order into shards of at most `max_shard_bytes` (a larger tensor
    gets a shard of its own)."""
    shards, current, size = [], [], 0
    for e in entries:
        if current and size + e.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current:
        shards.append(current)
    return shards


def write_sharded(directory, entries: list[TensorEntry], max_shard_bytes: int,
                  metadata=None, on_tensor=None) -> list[str]:
    """Write `entries` as transformers does: `model.safetensors` when one shard suffices,
    else `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`.
    Returns the file names written."""
    directory = Path(directory)
    shards = plan_shards(entries, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(directory / SINGLE_NAME, shards[0], metadata, on_tensor)
        return [SINGLE_NAME]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = shard_name(i, len(shards))
        write_safetensors(directory / fname, shard, metadata, on_tensor)
        names.append(fname)
        weight_map.update({e.name: fname for e in shard})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
             "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_NAME]
