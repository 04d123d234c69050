"""Requantize a dynamic-int8 `.tflite` export to int4 blockwise, streaming, from the float weights.

ai-edge-quantizer produces the int4 modes from a float32 `.tflite` file that it holds in memory
about 4.5 times over, and TensorFlow's converter needs about 3 times the float32 weights to
write that file: for Gemma 2 2B (10.5 GB of float32 weights) neither fits in 24 GiB. The
dynamic-int8 conversion does. This module turns that int8 file into the int4 file
ai-edge-quantizer would have written from the float32 one:

- every weight of a FULLY_CONNECTED, an EMBEDDING_LOOKUP or a table GATHER (a stored 2-D table
  read with 1-D ids on axis 0) is quantized again from its ORIGINAL float32 values (not from
  the int8 ones), with ai-edge-quantizer's own functions, and encoded as it encodes its
  "dynamic" int4 blockwise recipe: INT4 values (two per byte, low nibble first), a
  BlockwiseQuantization (block size, no zero points, quantized dimension 0) whose scales are a
  FLOAT16 tensor `<name>_scales` of shape [rows, cols / block] (float32 scale rounded to
  bfloat16, then stored as float16), FULLY_CONNECTED at its float32 version with
  `asymmetric_quantize_inputs` off, and a table GATHER (with the DEQUANTIZE after it) replaced
  by one EMBEDDING_LOOKUP (version 1) that outputs float32, as `quantize.
  gathers_to_embedding_lookups` does before ai-edge-quantizer runs. A weight buffer shared by
  several tensors (the tied embedding: the lookup and the output head, in every signature)
  stays one buffer, and its scales another one;
- everything else (graph, signatures, other buffers' bytes) is copied as is.

Finding each weight's float values: by value, not by name (the converter names constants after
whatever op produced them, e.g. `mul` for the embedding table). `weights` maps names of
your choice to float arrays (or to zero-argument callables returning one, so that a weight is
only loaded when needed). An int8 tensor q with step s comes from W exactly when
`|q * s - W| <= s / 2` everywhere (int8 rounding), and a different weight of the same shape
misses that bound almost everywhere. So: a first pass loads each candidate once and checks
512 fixed positions of every int8 weight with the same number of values, in two layouts (W
reshaped to the tensor's [rows, cols], or to [cols, rows] and transposed, e.g. a Keras Dense
kernel [in, out] for a FULLY_CONNECTED weight [out, in]); each int8 weight must match exactly
one (candidate, layout), or the call fails naming the tensor. The second pass, while writing,
checks every value before quantizing it. The values must be those the float32 graph stores:
for our exporter's tied embedding that is `embedding / final_logit_softcapping` (see
`keras_weights` and `checkpoint_weights`).

Memory: the file is memory-mapped and only its flatbuffer (tensors, ops: kilobytes to a few
MB) is parsed; one float weight is held at a time (plus 16 MB working chunks); unchanged
buffers are copied file to file by the kernel (`os.copy_file_range`); the output keeps its
buffers after the flatbuffer (16-byte aligned offsets, like ai-edge-quantizer's large-model
writer), so it may exceed 2 GB. It is written under a temporary name and renamed when
complete.

Example:
>>> requantize_tflite("gemma_int8.tflite", keras_weights(model), "int4_block32",
...                   "gemma_int4.tflite")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from pathlib import Path

import numpy as np

BLOCK_SIZES = {"int4_block32": 32, "int4_block128": 128}

_ALIGN = 16
_CHUNK_BYTES = 16 << 20
_SAMPLES = 512
_TOLERANCE = 1.001  # |q * s - W| <= s / 2 times this: the converter rounds W * (1 / s)


def requantize_tflite(int8_path, weights, quantize, out_path, progress=False):
    """Write `out_path`: the dynamic-int8 file `int8_path` with its weights at `quantize`.

    Args:
      int8_path: a `.tflite` file from `export_tflite(..., quantize="dynamic_int8")`.
      weights: `{name: float array or zero-argument callable returning one}` holding the
        float32 values of every int8 weight in the file (more entries are fine), in the
        layout of the file's tensor or transposed.
      quantize: "int4_block32" or "int4_block128".
      out_path: the output file, written under a temporary name and renamed when complete.
    Returns the output path. Raises ValueError naming the tensor when a weight is missing,
    ambiguous or does not match, and when the file is not a complete `.tflite` flatbuffer.
    """
    if quantize not in BLOCK_SIZES:
        raise ValueError(f"quantize must be one of {', '.join(BLOCK_SIZES)}; got {quantize!r}")
    block = BLOCK_SIZES[quantize]
    out_path = Path(out_path)
    with _TFLiteFile(int8_path) as source:
        model = source.unpack()
        found = _find_weights(source, model, block)
        _match_sources(source, found, weights)
        scales_buffers = _rewrite_graph(model, found, block)
        _write(out_path, source, model, found, scales_buffers, weights, block, progress)
    return out_path


# ------------------------------------------------------------------ float weight sources
def keras_weights(model):
    """`{variable path: callable}` giving the float32 values the export graph stores for
    `model`'s weights: each variable as is, the embedding divided by the final soft-cap
    (`export._GemmaSignatures.table`)."""
    return {v.path: _graph_values(model, v.path, v.numpy) for v in model.variables}


def checkpoint_weights(checkpoint, model):
    """The same as `keras_weights`, read one tensor at a time from the exporter's SavedModel
    checkpoint (`<saved_model>/variables/variables`), whose `weights/<i>` is the i-th of
    `model.variables` (Dense kernels stored transposed; both layouts match)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(checkpoint))

    def loader(index):
        return lambda: reader.get_tensor(f"weights/{index}/.ATTRIBUTES/VARIABLE_VALUE")

    return {v.path: _graph_values(model, v.path, loader(i)) for i, v in enumerate(model.variables)}


def _graph_values(model, path, load):
    cap = model.config.final_logit_softcapping
    if not path.endswith("embed_tokens/embeddings") or not cap:
        return load
    return lambda: np.asarray(load(), np.float32) * np.float32(1.0 / cap)


# ------------------------------------------------------------------ reading the int8 file
@dataclasses.dataclass
class _Weight:
    """One stored weight buffer and the tensors (in every subgraph) that read it."""

    buffer: int
    name: str
    rows: int
    cols: int
    int8: bool  # else float32, quantized from its own stored values
    scales: np.ndarray | None  # int8 step of each row
    position: int
    nbytes: int
    uses: list = dataclasses.field(default_factory=list)  # (subgraph, tensor index)
    source: tuple | None = None  # (name in `weights`, transposed)


class _TFLiteFile:
    """A memory-mapped `.tflite` file: its flatbuffer and where each buffer's bytes are."""

    def __init__(self, path):
        from ai_edge_litert import schema_py_generated as schema

        self.schema = schema
        self.path = Path(path)
        self._file = open(self.path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size
        if self.size < 8 or self._file.read(8)[4:8] != b"TFL3":
            self._file.close()
            raise ValueError(f"{self.path} is not a .tflite flatbuffer (no TFL3 identifier)")
        self.data = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self.root = schema.Model.GetRootAs(self.data, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.root = None
        try:
            self.data.close()
        except BufferError:  # a ModelT's arrays still view it: unmapped when they are freed
            pass
        self._file.close()

    def fileno(self):
        return self._file.fileno()

    def unpack(self):
        """The model as a `ModelT` without buffer data (metadata buffers keep theirs)."""
        try:
            model = self.schema.ModelT.InitFromObj(self.root)
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

    def span(self, index):
        """(file position, size) of buffer `index`'s bytes, inline or after the flatbuffer."""
        buffer = self.root.Buffers(index)
        field = buffer._tab.Offset(4)
        if field:
            return buffer._tab.Vector(field), buffer._tab.VectorLen(field)
        return int(buffer.Offset()), int(buffer.Size())

    def read_bytes(self, positions):
        """The bytes at `positions`, one read each: touching the mapping instead would map
        (and count in RSS) the pages around every position."""
        return np.array([os.pread(self.fileno(), 1, int(p))[0] for p in positions], np.uint8)

    def read(self, position, count, dtype):
        """`count` values at `position`, copied out of the mapping."""
        nbytes = count * np.dtype(dtype).itemsize
        return np.frombuffer(os.pread(self.fileno(), nbytes, position), dtype)


def _opcode_name(model, op):
    from ai_edge_litert import schema_py_generated as schema

    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    names = {schema.BuiltinOperator.FULLY_CONNECTED: "FULLY_CONNECTED",
             schema.BuiltinOperator.EMBEDDING_LOOKUP: "EMBEDDING_LOOKUP",
             schema.BuiltinOperator.GATHER: "GATHER",
             schema.BuiltinOperator.DEQUANTIZE: "DEQUANTIZE"}
    return names.get(builtin, str(builtin))


def _weight_input(model, subgraph, op):
    """Index in `op.inputs` of the stored weight this module quantizes, or None."""
    name = _opcode_name(model, op)
    if name in ("FULLY_CONNECTED", "EMBEDDING_LOOKUP"):
        return 1
    if name == "GATHER" and _is_table_gather(model, subgraph, op):
        return 0
    return None


def _is_table_gather(model, subgraph, op):
    """GATHER(table, ids) of a stored 2-D table by 1-D ids, axis 0, no batch dims."""
    if len(op.inputs) != 2 or op.builtinOptions is None:
        return False
    table, ids = subgraph.tensors[op.inputs[0]], subgraph.tensors[op.inputs[1]]
    return (_is_stored(model, table) and len(table.shape) == 2 and len(ids.shape) == 1
            and op.builtinOptions.axis == 0 and op.builtinOptions.batchDims == 0)


def _is_stored(model, tensor):
    buffer = model.buffers[tensor.buffer]
    return tensor.buffer > 0 and (buffer.size > 0 or buffer.data is not None)


def _find_weights(source, model, block):
    """`{buffer: _Weight}` of every stored weight read by FULLY_CONNECTED, EMBEDDING_LOOKUP or
    a table GATHER, in buffer order."""
    schema = source.schema
    found = {}
    for s, subgraph in enumerate(model.subgraphs):
        for op in subgraph.operators:
            slot = _weight_input(model, subgraph, op)
            if slot is None or op.inputs[slot] < 0:
                continue
            t = int(op.inputs[slot])
            tensor = subgraph.tensors[t]
            if not _is_stored(model, tensor):
                continue
            weight = found.get(tensor.buffer)
            if weight is None:
                weight = found[tensor.buffer] = _new_weight(source, tensor, block, schema)
            if (s, t) not in weight.uses:
                weight.uses.append((s, t))
    _check_other_readers(model, found)
    return dict(sorted(found.items()))


def _new_weight(source, tensor, block, schema):
    name = tensor.name.decode()
    shape = [int(d) for d in tensor.shape]
    types = {schema.TensorType.INT8: True, schema.TensorType.FLOAT32: False}
    if tensor.type not in types:
        raise ValueError(f"tensor {name!r}: expected an int8 (or float32) weight, got tensor "
                         f"type {tensor.type}; requantize the dynamic_int8 export")
    if len(shape) != 2 or shape[1] % block:
        raise ValueError(f"tensor {name!r} has shape {shape}: blockwise quantization needs a "
                         f"2-D weight whose {shape[-1]} columns are a multiple of {block}")
    position, nbytes = source.span(tensor.buffer)
    int8 = types[tensor.type]
    return _Weight(tensor.buffer, name, shape[0], shape[1], int8,
                   _row_steps(tensor, shape[0], name) if int8 else None, position, nbytes)


def _row_steps(tensor, rows, name):
    """The int8 step of each row: one per-tensor scale, or per-channel along rows."""
    q = tensor.quantization
    scale = None if q is None or q.scale is None else np.asarray(q.scale, np.float32)
    zero = None if q is None or q.zeroPoint is None else np.asarray(q.zeroPoint)
    if scale is None or (zero is not None and zero.any()):
        raise ValueError(f"tensor {name!r}: expected symmetric int8 (scale, zero point 0)")
    if scale.size == 1:
        return np.full(rows, scale[0], np.float32)
    if scale.size == rows and q.quantizedDimension == 0:
        return scale
    raise ValueError(f"tensor {name!r}: {scale.size} int8 scales on dimension "
                     f"{q.quantizedDimension}; expected one, or one per row")


def _check_other_readers(model, found):
    """Refuse weights that another op reads too: it would read int4 data it cannot."""
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            slot = _weight_input(model, subgraph, op)
            for i, t in enumerate(op.inputs):
                if t >= 0 and i != slot and subgraph.tensors[t].buffer in found:
                    name = subgraph.tensors[t].name.decode()
                    raise ValueError(f"weight {name!r} is also read by {_opcode_name(model, op)}"
                                     f" (input {i}), which int4 weights do not support")


# ------------------------------------------------------------------ matching float sources
def _load(weights, name):
    value = weights[name]
    try:
        array = np.asarray(value() if callable(value) else value)
    except Exception as e:
        raise ValueError(f"weights[{name!r}] could not be loaded: {e}") from e
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"weights[{name!r}] holds {array.dtype} values; expected floats")
    return array.astype(np.float32, copy=False)


def _view(array, weight, transposed):
    """`array` as the [rows, cols] matrix of `weight` (reshaped, or reshaped and transposed)."""
    if transposed:
        return array.reshape(weight.cols, weight.rows).T
    return array.reshape(weight.rows, weight.cols)


def _sample(source, weight):
    """Fixed sample positions of `weight` and the dequantized int8 values there."""
    rng = np.random.default_rng(weight.rows * 1_000_003 + weight.cols)
    count = min(_SAMPLES, weight.rows * weight.cols)
    flat = np.sort(rng.choice(weight.rows * weight.cols, count, replace=False))
    rows, cols = flat // weight.cols, flat % weight.cols
    q = source.read_bytes(weight.position + flat).view(np.int8)
    return rows, cols, q * weight.scales[rows]


def _rounding_error(values, dequantized, steps):
    """Largest |values - dequantized| in units of half an int8 step."""
    return float(np.max(np.abs(values - dequantized) / np.maximum(steps / 2, 1e-30)))


def _match_sources(source, found, weights):
    """Set `weight.source` of every int8 weight: the one (name, layout) that rounds to it."""
    pending = [w for w in found.values() if w.int8]
    by_size = {}
    for w in pending:
        by_size.setdefault(w.rows * w.cols, []).append(w)
    samples = {w.buffer: _sample(source, w) for w in pending}
    matches = {w.buffer: [] for w in pending}
    closest = {}
    for name in weights:
        array = _load(weights, name)
        for w in by_size.get(array.size, []):
            rows, cols, dequantized = samples[w.buffer]
            for transposed in (False, True):
                values = _view(array, w, transposed)[rows, cols]
                error = _rounding_error(values, dequantized, w.scales[rows])
                if error <= _TOLERANCE:
                    matches[w.buffer].append((name, transposed))
                elif error < closest.get(w.buffer, (np.inf,))[0]:
                    closest[w.buffer] = (error, name, transposed)
        del array
    for w in pending:
        found_here = matches[w.buffer]
        if len(found_here) > 1:
            raise ValueError(f"tensor {w.name!r} [{w.rows}, {w.cols}] is ambiguous: "
                             f"{_describe(found_here)} all round to its int8 values")
        if not found_here:
            raise ValueError(_missing_message(w, closest.get(w.buffer)))
        w.source = found_here[0]


def _describe(matches):
    return ", ".join(f"{name!r}{' (transposed)' if t else ''}" for name, t in matches)


def _missing_message(weight, closest):
    message = (f"no float weight matches tensor {weight.name!r} [{weight.rows}, "
               f"{weight.cols}] (int8): none of `weights` has {weight.rows * weight.cols:,} "
               f"values within half an int8 step of it")
    if closest is not None:
        error, name, transposed = closest
        message += (f"; the closest, {_describe([(name, transposed)])}, is off by up to "
                    f"{error / 2:.3g} steps (a missing constant factor, e.g. the embedding "
                    f"divided by final_logit_softcapping?)")
    return message


# ------------------------------------------------------------------ rewriting the graph
def _rewrite_graph(model, found, block):
    """Retype the weights, add their scales, turn table GATHERs into EMBEDDING_LOOKUPs and
    fix the op codes. Returns `{weight buffer: scales buffer}`."""
    from ai_edge_litert import schema_py_generated as schema

    scales_buffers = {}
    for w in found.values():
        scales_buffers[w.buffer] = len(model.buffers)
        model.buffers.append(schema.BufferT())
        for s, t in w.uses:
            _retype(model.subgraphs[s], t, scales_buffers[w.buffer], w, block)
    wanted = {}  # id(op) -> the builtin operator it becomes
    for subgraph in model.subgraphs:
        for op in list(subgraph.operators):
            _rewrite_op(model, subgraph, op, found, wanted)
    _set_opcodes(model, wanted)
    return scales_buffers


def _retype(subgraph, index, scales_buffer, weight, block):
    from ai_edge_litert import schema_py_generated as schema

    tensor = subgraph.tensors[index]
    scales = schema.TensorT()
    scales.name = tensor.name + b"_scales"
    scales.shape = [weight.rows, weight.cols // block]
    scales.type = schema.TensorType.FLOAT16
    scales.buffer = scales_buffer
    subgraph.tensors.append(scales)
    details = schema.BlockwiseQuantizationT()
    details.scales, details.zeroPoints, details.blockSize = len(subgraph.tensors) - 1, -1, block
    q = schema.QuantizationParametersT()
    q.detailsType = schema.QuantizationDetails.BlockwiseQuantization
    q.details = details
    q.quantizedDimension = 0
    tensor.quantization = q
    tensor.type = schema.TensorType.INT4


def _rewrite_op(model, subgraph, op, found, wanted):
    from ai_edge_litert import schema_py_generated as schema

    slot = _weight_input(model, subgraph, op)
    if slot is None or op.inputs[slot] < 0:
        return
    if subgraph.tensors[op.inputs[slot]].buffer not in found:
        return
    kind = _opcode_name(model, op)
    if kind == "FULLY_CONNECTED":
        op.builtinOptions.asymmetricQuantizeInputs = False
        wanted[id(op)] = schema.BuiltinOperator.FULLY_CONNECTED
        return
    if kind == "GATHER":
        op.inputs = [int(op.inputs[1]), int(op.inputs[0])]
        op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.NONE, None
        _drop_dequantize(model, subgraph, op)
    wanted[id(op)] = schema.BuiltinOperator.EMBEDDING_LOOKUP


def _drop_dequantize(model, subgraph, op):
    """An int8 GATHER feeds one DEQUANTIZE; EMBEDDING_LOOKUP outputs its float32 directly
    (the int8 tensor between them stays in the list, read by nothing)."""
    from ai_edge_litert import schema_py_generated as schema

    out = int(op.outputs[0])
    if subgraph.tensors[out].type == schema.TensorType.FLOAT32:
        return
    readers = [o for o in subgraph.operators if out in [int(i) for i in o.inputs]]
    if (len(readers) != 1 or _opcode_name(model, readers[0]) != "DEQUANTIZE"
            or out in [int(i) for i in subgraph.outputs]):
        name = subgraph.tensors[out].name.decode()
        raise ValueError(f"the int8 lookup {name!r} should feed exactly one DEQUANTIZE")
    op.outputs = [int(readers[0].outputs[0])]
    subgraph.operators.remove(readers[0])


def _set_opcodes(model, wanted):
    """Point each rewritten op, and every other op of its kind, at one op code entry whose
    version is the largest float32 version among them (the converter's rule: one entry per
    operator), reusing the group's first entry when nothing else reads it; then drop the
    entries no op uses any more (the int8 lookups' DEQUANTIZE)."""
    from ai_edge_litert import schema_py_generated as schema

    ops = [op for subgraph in model.subgraphs for op in subgraph.operators]
    for builtin in sorted(set(wanted.values())):
        group = [op for op in ops if wanted.get(id(op), _builtin(model, op)) == builtin]
        members = {id(op) for op in group}
        index = group[0].opcodeIndex
        if any(op.opcodeIndex == index and id(op) not in members for op in ops):
            index = len(model.operatorCodes)
            model.operatorCodes.append(schema.OperatorCodeT())
        code = model.operatorCodes[index]
        code.builtinCode, code.deprecatedBuiltinCode = builtin, min(builtin, 127)
        code.version = max(_float_version(builtin, op) for op in group)
        for op in group:
            op.opcodeIndex = index
    used = sorted({op.opcodeIndex for op in ops})
    remap = {old: new for new, old in enumerate(used)}
    model.operatorCodes = [model.operatorCodes[i] for i in used]
    for op in ops:
        op.opcodeIndex = remap[op.opcodeIndex]


def _builtin(model, op):
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _float_version(builtin, op):
    """The version TFLite's op_version.cc gives this op with float32 input and weights, which
    ai-edge-quantizer keeps when it quantizes the weights (EMBEDDING_LOOKUP: 1)."""
    from ai_edge_litert import schema_py_generated as schema

    if builtin != schema.BuiltinOperator.FULLY_CONNECTED:
        return 1
    if len(op.inputs) == 2:
        return 6
    return 5 if op.builtinOptions.keepNumDims else 1


# ------------------------------------------------------------------ writing
def _write(out_path, source, model, found, scales_buffers, weights, block, progress):
    """Pack the flatbuffer with every buffer's final offset, then stream the buffers' data."""
    order = _data_order(source, model, found, scales_buffers, block)
    head = _pack_with_offsets(model, order)
    scales_of = {scales: weight for weight, scales in scales_buffers.items()}
    tmp = out_path.with_name(f".{out_path.name}.partial")
    bar = _progress(progress, len(found))
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for index, size in order:
                _pad(f)
                assert f.tell() == model.buffers[index].offset
                if index in found:
                    scales = _write_weight(f, source, found[index], weights, block)
                    bar.update(1)
                elif index in scales_of:
                    f.write(scales.tobytes())
                else:
                    _copy(source, index, f)
                assert f.tell() == model.buffers[index].offset + size
            _pad(f)
        os.replace(tmp, out_path)
    finally:
        bar.close()
        if tmp.exists():
            tmp.unlink()


def _data_order(source, model, found, scales_buffers, block):
    """`[(buffer, size)]` in file order: every stored buffer except the metadata ones (those
    stay in the flatbuffer), each int4 weight directly followed by its scales."""
    inline = {m.buffer for m in model.metadata or []}
    scales = set(scales_buffers.values())
    order = []
    for index in range(len(model.buffers)):
        if index in inline or index in scales:
            continue
        if index in found:
            w = found[index]
            order.append((index, w.rows * w.cols // 2))
            order.append((scales_buffers[index], w.rows * (w.cols // block) * 2))
        elif source.span(index)[1]:
            order.append((index, source.span(index)[1]))
    return order


def _pack_with_offsets(model, order):
    """The flatbuffer, padded to `_ALIGN`, with each buffer's offset and size set."""
    import flatbuffers

    def pack():
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
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
    return -(-n // _ALIGN) * _ALIGN


def _pad(f):
    f.write(b"\0" * (_round_up(f.tell()) - f.tell()))


def _copy(source, index, f):
    """Copy buffer `index`'s bytes from the input file to `f`: in the kernel when it can
    (`os.copy_file_range`, no user memory), else through 16 MB reads."""
    position, size = source.span(index)
    f.flush()
    done = 0
    copy_file_range = getattr(os, "copy_file_range", None)
    try:
        while copy_file_range and done < size:
            copied = copy_file_range(source.fileno(), f.fileno(), size - done, position + done)
            if copied <= 0:
                break
            done += copied
    except OSError:  # not supported between these files: read and write instead
        pass
    f.seek(0, os.SEEK_END)
    while done < size:
        chunk = os.pread(source.fileno(), min(size - done, _CHUNK_BYTES), position + done)
        if not chunk:
            raise ValueError(f"{source.path} ended inside buffer {index}")
        f.write(chunk)
        done += len(chunk)


def _write_weight(f, source, weight, weights, block):
    """Write `weight`'s int4 values to `f`, quantized chunk by chunk; return its scales."""
    if weight.int8:
        name, transposed = weight.source
        matrix = _view(_load(weights, name), weight, transposed)
    else:
        matrix = None
    rows_per_chunk = max(2, _CHUNK_BYTES // (4 * weight.cols) // 2 * 2)
    scales = []
    for start in range(0, weight.rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, weight.rows)
        if matrix is None:
            values = source.read(weight.position + 4 * start * weight.cols,
                                 (stop - start) * weight.cols, np.float32)
            values = values.reshape(stop - start, weight.cols)
        else:
            values = np.ascontiguousarray(matrix[start:stop], np.float32)
            _verify(source, weight, start, values)
        packed, chunk_scales = quantize_int4_blockwise(values, block)
        f.write(packed.tobytes())
        scales.append(chunk_scales)
    return np.concatenate(scales)


def _verify(source, weight, start, values):
    """Raise unless `values` (rows `start`...) round to the int8 data of `weight`."""
    q = source.read(weight.position + start * weight.cols, values.size, np.int8)
    steps = weight.scales[start:start + len(values), None]
    error = np.abs(values - q.reshape(values.shape) * steps) / np.maximum(steps / 2, 1e-30)
    if error.max() > _TOLERANCE:
        row = start + int(np.argmax(error.max(axis=1)))
        name, transposed = weight.source
        raise ValueError(f"weights[{name!r}]{' transposed' if transposed else ''} matched "
                         f"tensor {weight.name!r} on a sample but not at row {row}: off by "
                         f"{error.max() / 2:.3g} int8 steps")


def quantize_int4_blockwise(values, block):
    """ai-edge-quantizer's dynamic int4 blockwise quantization of float32 rows [n, cols]:
    returns (packed int4 bytes, float16 scales [n, cols / block]), as it stores them."""
    import ml_dtypes
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt
    from ai_edge_quantizer.transformations import transformation_utils

    granularity = qtyping.QuantGranularity[f"BLOCKWISE_{block}"]
    blocks = values.reshape(values.shape[0], -1, block)
    zero_point, scale = uqt.tensor_zp_scale_from_min_max(
        blocks.min(axis=2), blocks.max(axis=2), 4, True, granularity)
    params = qtyping.UniformQuantParams(num_bits=4, quantized_dimension=1, scale=scale,
                                        zero_point=zero_point, symmetric=True,
                                        block_size=block)
    q = uqt.uniform_quantize(values, params, is_blockwise_quant=True)
    packed = transformation_utils.pack_data(4, np.ravel(q).view(np.uint8))
    return packed, scale.astype(ml_dtypes.bfloat16).astype(np.float16)


class _progress:
    def __init__(self, enabled, total):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="requantize", unit="weight")

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
