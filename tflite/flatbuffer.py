"""Reading and rewriting `.tflite` files: the one module that parses LiteRT's flatbuffer.

- `TFLiteFile`: a memory-mapped file. Its tables are read in place (operators, signatures,
  stored tensors, metadata) without touching the weight buffers, so a multi-GB file opens
  instantly; `unpack()` gives the model as objects (`schema.ModelT`, buffer data left in the
  file) for a rewrite, and `span`, `read`, `copy_buffer` reach each buffer's bytes.
- `write_with_offsets`: write a rewritten `ModelT` with its buffers after the flatbuffer at
  16-byte aligned offsets (as TensorFlow's converter writes files over 2 GB), each buffer's
  bytes streamed by the caller, under a temporary name renamed when complete.
- `gathers_to_lookups_in_place`: the one in-place patch (no re-pack) of a packed file.
- Helpers on the object API: `builtin`, `is_stored`, `is_table_gather`, `opcode_index`.

Needs only the schema `ai-edge-litert` ships and `flatbuffers`: no TensorFlow, so the
runtime side (`file_info`, `litertlm`) can read files too.

Example:
>>> with TFLiteFile("gemma.tflite") as f:
...     f.signature_names(), f.op_names(), f.metadata("gemma_keras_weights")
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from gemma_keras.atomic_files import atomic_file

IDENTIFIER = b"TFL3"
ALIGN = 16  # buffers after the flatbuffer start at multiples of this
_CHUNK_BYTES = 16 << 20
OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """A constant tensor: where it is used and which buffer holds its bytes."""

    subgraph: str
    name: str
    shape: tuple
    dtype: str
    buffer: int
    nbytes: int


class TFLiteFile:
    """A memory-mapped `.tflite` file: its flatbuffer's tables and where each buffer's bytes
    are. Raises ValueError naming the file when it is not a `.tflite` flatbuffer."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size
        if self.size < 8 or self._file.read(8)[4:8] != IDENTIFIER:
            self._file.close()
            raise ValueError(f"{self.path} is not a .tflite flatbuffer (no TFL3 identifier)")
        self.data = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self.root = schema.Model.GetRootAs(self.data, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.root = None
        try:
            self.data.close()
        except BufferError:  # a ModelT's arrays still view it: unmapped when they are freed
            pass
        self._file.close()

    def fileno(self):
        return self._file.fileno()

    # -------------------------------------------------------------- the model as objects
    def unpack(self):
        """The model as a `ModelT` without buffer data (metadata buffers keep theirs)."""
        try:
            model = schema.ModelT.InitFromObj(self.root)
        except Exception as e:  # flatbuffers raises plain errors on garbage
            raise ValueError(f"{self.path} is not a readable .tflite flatbuffer: {e}") from None
        keep = {m.buffer for m in model.metadata or []}
        for index, buffer in enumerate(model.buffers):
            position, nbytes = self.span(index)
            if position + nbytes > self.size:
                raise ValueError(f"{self.path} is truncated: buffer {index} ends at byte "
                                 f"{position + nbytes:,}, the file has {self.size:,} bytes")
            if index not in keep:
                buffer.data = None
            elif buffer.data is not None:
                buffer.data = bytes(buffer.data)  # outlives the mapping
        return model

    # -------------------------------------------------------------- buffer bytes
    def span(self, index):
        """(file position, size) of buffer `index`'s bytes, inline or after the flatbuffer."""
        buffer = self.root.Buffers(index)
        field = buffer._tab.Offset(4)
        if field:
            return buffer._tab.Vector(field), buffer._tab.VectorLen(field)
        return int(buffer.Offset()), int(buffer.Size())

    def read(self, position, count, dtype):
        """`count` values at `position`, copied out of the mapping (one read: touching the
        mapping instead would map, and count in RSS, the pages around it)."""
        nbytes = count * np.dtype(dtype).itemsize
        return np.frombuffer(os.pread(self.fileno(), nbytes, position), dtype)

    def buffer_bytes(self, index):
        """Buffer `index`'s bytes (whole: for small buffers and comparisons)."""
        position, size = self.span(index)
        return os.pread(self.fileno(), size, position)

    def copy_buffer(self, index, f):
        """Append buffer `index`'s bytes to the open file `f`: in the kernel when it can
        (`os.copy_file_range`, no user memory), else through 16 MB reads."""
        position, size = self.span(index)
        f.flush()
        done = 0
        copy_file_range = getattr(os, "copy_file_range", None)
        try:
            while copy_file_range and done < size:
                copied = copy_file_range(self.fileno(), f.fileno(), size - done, position + done)
                if copied <= 0:
                    break
                done += copied
        except OSError:  # not supported between these files: read and write instead
            pass
        f.seek(0, os.SEEK_END)
        while done < size:
            chunk = os.pread(self.fileno(), min(size - done, _CHUNK_BYTES), position + done)
            if not chunk:
                raise ValueError(f"{self.path} ended inside buffer {index}")
            f.write(chunk)
            done += len(chunk)

    def metadata(self, name):
        """The bytes of metadata entry `name`, or None when the file has none."""
        for i in range(self.root.MetadataLength()):
            entry = self.root.Metadata(i)
            if entry.Name() == name.encode():
                return self.buffer_bytes(entry.Buffer())
        return None

    # -------------------------------------------------------------- what the file holds
    def op_names(self) -> set:
        """Names of the operators used: builtins by name, custom ops as `CUSTOM:<name>`."""
        names = set()
        for i in range(self.root.OperatorCodesLength()):
            code = self.root.OperatorCodes(i)
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == schema.BuiltinOperator.CUSTOM:
                names.add(f"CUSTOM:{(code.CustomCode() or b'').decode()}")
            else:
                names.add(OP_NAMES.get(builtin, str(builtin)))
        return names

    def signature_names(self) -> list:
        return [self.root.SignatureDefs(i).SignatureKey().decode()
                for i in range(self.root.SignatureDefsLength())]

    def signatures(self) -> dict:
        """`{signature: ({input name: shape}, {output name: shape})}`."""
        out = {}
        for s in range(self.root.SignatureDefsLength()):
            signature = self.root.SignatureDefs(s)
            graph = self.root.Subgraphs(signature.SubgraphIndex())

            def shapes(count, get):
                return {get(i).Name().decode():
                        tuple(int(d) for d in graph.Tensors(get(i).TensorIndex()).ShapeAsNumpy())
                        for i in range(count)}

            out[signature.SignatureKey().decode()] = (
                shapes(signature.InputsLength(), signature.Inputs),
                shapes(signature.OutputsLength(), signature.Outputs))
        return out

    def _buffer_nbytes(self, index):
        buffer = self.root.Buffers(index)
        return buffer.DataLength() or int(buffer.Size())

    def stored_tensors(self, min_bytes=1) -> list:
        """`StoredTensor`s with stored data of at least `min_bytes`, in every subgraph."""
        out = []
        for s in range(self.root.SubgraphsLength()):
            subgraph = self.root.Subgraphs(s)
            sg_name = (subgraph.Name() or b"").decode()
            for t in range(subgraph.TensorsLength()):
                tensor = subgraph.Tensors(t)
                nbytes = self._buffer_nbytes(tensor.Buffer()) if tensor.Buffer() else 0
                if nbytes >= min_bytes:
                    out.append(StoredTensor(
                        sg_name, tensor.Name().decode(), tuple(tensor.ShapeAsNumpy().tolist()),
                        TYPE_NAMES.get(tensor.Type(), str(tensor.Type())), tensor.Buffer(),
                        nbytes))
        return out

    def stored_bytes(self) -> int:
        """Bytes of all distinct constant buffers."""
        return sum(self._buffer_nbytes(b) for b in {t.buffer for t in self.stored_tensors()})

    def quantization_param_bytes(self) -> int:
        """Bytes of stored quantization parameters (a float32 scale and an int64 zero point
        per channel), each table counted once however many tensors point at it."""
        total, seen = 0, set()
        for s in range(self.root.SubgraphsLength()):
            subgraph = self.root.Subgraphs(s)
            for t in range(subgraph.TensorsLength()):
                q = subgraph.Tensors(t).Quantization()
                if q is not None and q._tab.Pos not in seen:
                    seen.add(q._tab.Pos)
                    total += 4 * q.ScaleLength() + 8 * q.ZeroPointLength()
        return total


# ------------------------------------------------------------------ the object API (ModelT)
def builtin(model, op):
    """The builtin operator code of `op` (a `ModelT` operator)."""
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def is_stored(model, tensor):
    """True when `tensor` reads a buffer with data (a constant)."""
    buffer = model.buffers[tensor.buffer]
    return tensor.buffer > 0 and (buffer.size > 0 or buffer.data is not None)


def is_table_gather(model, subgraph, op):
    """GATHER(table, ids) of a stored 2-D table by 1-D ids, axis 0, no batch dims."""
    if builtin(model, op) != schema.BuiltinOperator.GATHER:
        return False
    if len(op.inputs) != 2 or op.builtinOptionsType != schema.BuiltinOptions.GatherOptions:
        return False
    table, ids = subgraph.tensors[op.inputs[0]], subgraph.tensors[op.inputs[1]]
    return (is_stored(model, table) and len(table.shape) == 2 and len(ids.shape) == 1
            and op.builtinOptions.axis == 0 and op.builtinOptions.batchDims == 0)


def opcode_index(model, code):
    """Index of the operator code entry of builtin `code`, added (version 1) if missing."""
    for i, entry in enumerate(model.operatorCodes):
        if max(entry.builtinCode, entry.deprecatedBuiltinCode) == code:
            return i
    entry = schema.OperatorCodeT()
    entry.builtinCode, entry.deprecatedBuiltinCode = code, min(code, 127)
    entry.version = 1
    model.operatorCodes.append(entry)
    return len(model.operatorCodes) - 1


def drop_unused_opcodes(model):
    """Drop the operator code entries no operator uses, renumbering the others."""
    ops = [op for subgraph in model.subgraphs for op in subgraph.operators]
    used = sorted({op.opcodeIndex for op in ops})
    remap = {old: new for new, old in enumerate(used)}
    model.operatorCodes = [model.operatorCodes[i] for i in used]
    for op in ops:
        op.opcodeIndex = remap[op.opcodeIndex]


def add_metadata(model, name, data):
    """Append metadata entry `name` holding `data` (bytes) in a new buffer."""
    buffer = schema.BufferT()
    buffer.data = data
    entry = schema.MetadataT()
    entry.name, entry.buffer = name.encode(), len(model.buffers)
    model.buffers.append(buffer)
    model.metadata = list(model.metadata or []) + [entry]


# ------------------------------------------------------------------ writing
def write_with_offsets(out_path, model, order, write_buffer):
    """Write `out_path`: `model`'s flatbuffer with each buffer of `order` (`[(index, size)]`)
    at its final offset after it (16-byte aligned), each buffer's bytes written by
    `write_buffer(file, index)`; under a temporary name, renamed when complete."""
    head = _pack_with_offsets(model, order)
    with atomic_file(out_path) as tmp, open(tmp, "wb") as f:
        f.write(head)
        for index, size in order:
            _pad(f)
            assert f.tell() == model.buffers[index].offset
            write_buffer(f, index)
            if f.tell() != model.buffers[index].offset + size:
                raise AssertionError(f"buffer {index}: {f.tell() - model.buffers[index].offset}"
                                     f" bytes written, {size} expected")
        _pad(f)
    return Path(out_path)


def _pack_with_offsets(model, order):
    """The flatbuffer, padded to `ALIGN`, with each buffer's offset and size set."""
    def pack():
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=IDENTIFIER)
        return bytes(builder.Output())

    for index, _ in order:  # nonzero placeholders: the packed size no longer depends on them
        model.buffers[index].offset = model.buffers[index].size = 1
    start = _round_up(len(pack()))
    position = start
    for index, size in order:
        model.buffers[index].offset, model.buffers[index].size = position, size
        position = _round_up(position + size)
    head = pack()
    if _round_up(len(head)) != start:
        raise AssertionError("the flatbuffer changed size when its offsets were set")
    return head


def _round_up(n):
    return -(-n // ALIGN) * ALIGN


def _pad(f):
    f.write(b"\0" * (_round_up(f.tell()) - f.tell()))


# ------------------------------------------------------------------ patching in place
def gathers_to_lookups_in_place(flatbuffer: bytes) -> bytes:
    """`flatbuffer` with every GATHER of a stored 2-D table by 1-D ids made an
    EMBEDDING_LOOKUP, patched in place (nothing re-packed: files with offset buffers stay
    valid): the GATHER operator code becomes EMBEDDING_LOOKUP, each op's two inputs swap, its
    options type becomes NONE. Returned unchanged unless every op using the GATHER code is
    such a lookup, or when a field to patch was left out by the builder (a default value)."""
    data = bytearray(flatbuffer)
    objects = schema.ModelT.InitFromPackedBuf(data, 0)
    root = schema.Model.GetRootAsModel(data, 0)
    gather = schema.BuiltinOperator.GATHER
    gather_codes = [i for i, c in enumerate(objects.operatorCodes)
                    if max(c.builtinCode, c.deprecatedBuiltinCode) == gather]
    ops = []
    for s, subgraph in enumerate(objects.subgraphs):
        for o, op in enumerate(subgraph.operators):
            if op.opcodeIndex in gather_codes:
                if not is_table_gather(objects, subgraph, op):
                    return flatbuffer
                ops.append(root.Subgraphs(s).Operators(o))
    if not ops:
        return flatbuffer

    def field(table, vtable_offset):
        offset = table._tab.Offset(vtable_offset)
        if not offset:  # a default value the builder left out: cannot patch in place
            raise _CannotPatch
        return table._tab.Pos + offset

    lookup = schema.BuiltinOperator.EMBEDDING_LOOKUP
    try:
        patches = []
        for i in gather_codes:
            code = root.OperatorCodes(i)
            patches.append(("<b", field(code, 4), lookup))   # deprecated_builtin_code
            patches.append(("<i", field(code, 10), lookup))  # builtin_code
        for op in ops:
            field(op, 6)
            first = op._tab.Vector(op._tab.Offset(6))        # inputs[0]
            table, ids = op.Inputs(0), op.Inputs(1)
            patches += [("<i", first, ids), ("<i", first + 4, table)]
            patches.append(("<B", field(op, 10), schema.BuiltinOptions.NONE))
    except _CannotPatch:
        return flatbuffer
    for fmt, position, value in patches:
        struct.pack_into(fmt, data, position, value)
    return bytes(data)


class _CannotPatch(Exception):
    pass


def rewrite_file(file, model, out_path):
    """Write `out_path`: `model` (unpacked from the open `file`, then edited, its buffer list
    extended at most by metadata) with every other buffer's bytes copied from `file`."""
    inline = {m.buffer for m in model.metadata or []}
    order = [(i, file.span(i)[1]) for i in range(file.root.BuffersLength())
             if i not in inline and file.span(i)[1]]
    return write_with_offsets(out_path, model, order, lambda f, i: file.copy_buffer(i, f))
