"""The plan of a requantization: which stored weights `requantize_tflite` re-encodes, at which
bits and block size, and where each one's float values come from.

A weight is every stored 2-D buffer read by a FULLY_CONNECTED, an EMBEDDING_LOOKUP or a table
GATHER (a stored table read with 1-D ids on axis 0), with the tensors (one per signature)
that read it. An int8 weight's float values are those of the checkpoint tensor the file's
weight map names for its buffer (`weight_map_metadata`), times the map's factor; a float32
weight is requantized from its own stored values. Per channel, each weight's row scales come
from a first pass over its values.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gemma_keras.tflite import flatbuffer
from gemma_keras.tflite.flatbuffer import schema
from gemma_keras.tflite.weight_encoding import channel_scales
from gemma_keras.tflite.weight_map_metadata import read_weight_map

# Each mode's block size along a row; None: one scale per row (per channel).
BLOCK_SIZES = {"int4_block32": 32, "int4_block128": 128, "int4_channel": None,
               "int8_channel": None}
BITS = {"int8_channel": 8}  # the others: 4
_CHUNK_BYTES = 16 << 20


@dataclasses.dataclass
class Weight:
    """One stored weight buffer, the tensors (in every subgraph) that read it, and its plan."""

    buffer: int
    name: str
    rows: int
    cols: int
    int8: bool  # else float32, quantized from its own stored values
    scales: np.ndarray | None  # int8 step of each row
    position: int
    nbytes: int
    uses: list = dataclasses.field(default_factory=list)  # (subgraph, tensor index)
    source: str | None = None  # int8: the checkpoint tensor (weight map) holding its values
    factor: float = 1.0  # the file stores `factor * checkpoint values`
    bits: int = 4  # 4, or 8 for "int8_channel"
    channel_scales: np.ndarray | None = None  # per channel: the float32 scale of each row
    quantization: object = None  # per channel: its QuantizationParametersT, shared by uses

    def source_rows(self, source, start, stop):
        """Rows start..stop of the float values the graph stores, from `source`."""
        values = source.rows(self.source, start, stop)
        if values.shape != (stop - start, self.cols):
            raise ValueError(f"{source}: tensor {self.source} rows {start}:{stop} have shape "
                             f"{list(values.shape)}; tensor {self.name!r} needs "
                             f"[{stop - start}, {self.cols}]")
        return values * np.float32(self.factor) if self.factor != 1.0 else values

    def stored_rows(self, file, start, stop):
        """Rows start..stop of a float32 weight stored in the file."""
        values = file.read(self.position + 4 * start * self.cols, (stop - start) * self.cols,
                           np.float32)
        return values.reshape(stop - start, self.cols)


def plan(file, model, quantize, source):
    """`{buffer: Weight}` of every weight of `model` (unpacked from the open `file`) to
    requantize at `quantize`, in buffer order, each with its source in `source` (a
    `weight_sources.WeightSource`) and, per channel, its row scales."""
    if quantize not in BLOCK_SIZES:
        raise ValueError(f"quantize must be one of {', '.join(BLOCK_SIZES)}; got {quantize!r}")
    block = BLOCK_SIZES[quantize]
    weights = find_weights(file, model, block)
    for w in weights.values():
        w.bits = BITS.get(quantize, 4)
    if any(w.int8 for w in weights.values()):
        _assign_sources(file, weights, source)
    if block is None:
        for w in weights.values():
            rows = (lambda a, b, w=w: w.source_rows(source, a, b)) if w.int8 else \
                (lambda a, b, w=w: w.stored_rows(file, a, b))
            w.channel_scales = channel_scales(_row_abs_max(rows, w.rows, w.cols), w.bits)
    return weights


def weight_input(model, subgraph, op):
    """Index in `op.inputs` of the stored weight requantize encodes, or None."""
    code = flatbuffer.builtin(model, op)
    if code in (schema.BuiltinOperator.FULLY_CONNECTED, schema.BuiltinOperator.EMBEDDING_LOOKUP):
        return 1
    if flatbuffer.is_table_gather(model, subgraph, op):
        return 0
    return None


def find_weights(file, model, block):
    """`{buffer: Weight}` of every stored weight read by FULLY_CONNECTED, EMBEDDING_LOOKUP or
    a table GATHER, in buffer order."""
    found = {}
    for s, subgraph in enumerate(model.subgraphs):
        for op in subgraph.operators:
            slot = weight_input(model, subgraph, op)
            if slot is None or op.inputs[slot] < 0:
                continue
            t = int(op.inputs[slot])
            tensor = subgraph.tensors[t]
            if not flatbuffer.is_stored(model, tensor):
                continue
            weight = found.get(tensor.buffer)
            if weight is None:
                weight = found[tensor.buffer] = _new_weight(file, tensor, block)
            if (s, t) not in weight.uses:
                weight.uses.append((s, t))
    _check_other_readers(model, found)
    return dict(sorted(found.items()))


def _new_weight(file, tensor, block):
    name = tensor.name.decode()
    shape = [int(d) for d in tensor.shape]
    types = {schema.TensorType.INT8: True, schema.TensorType.FLOAT32: False}
    if tensor.type not in types:
        raise ValueError(f"tensor {name!r}: expected an int8 (or float32) weight, got tensor "
                         f"type {tensor.type}; requantize the dynamic_int8 export")
    if len(shape) != 2 or (block and shape[1] % block) or shape[0] * shape[1] % 2:
        need = f"whose {shape[-1]} columns are a multiple of {block}" if block else "(even size)"
        raise ValueError(f"tensor {name!r} has shape {shape}: int4 quantization needs a 2-D "
                         f"weight {need}")
    position, nbytes = file.span(tensor.buffer)
    int8 = types[tensor.type]
    return Weight(tensor.buffer, name, shape[0], shape[1], int8,
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
            slot = weight_input(model, subgraph, op)
            for i, t in enumerate(op.inputs):
                if t >= 0 and i != slot and subgraph.tensors[t].buffer in found:
                    name = subgraph.tensors[t].name.decode()
                    code = flatbuffer.builtin(model, op)
                    raise ValueError(f"weight {name!r} is also read by "
                                     f"{flatbuffer.OP_NAMES.get(code, code)} (input {i}), "
                                     f"which int4 weights do not support")


def _assign_sources(file, weights, source):
    """Set `source` and `factor` of every int8 weight from the file's weight map."""
    weight_map = read_weight_map(file)
    if weight_map is None:
        raise ValueError(f"{file.path} records no weight map (metadata "
                         f"'gemma_keras_weights'), so its weights cannot be found by name: "
                         f"re-export it with this version of gemma_keras "
                         f"(gemma_keras.tflite.export_tflite, quantize='dynamic_int8')")
    names = source.names()
    for w in weights.values():
        if not w.int8:
            continue
        entry = weight_map.get(w.buffer)
        if entry is None:
            raise ValueError(f"tensor {w.name!r} (buffer {w.buffer}) is not in "
                             f"{file.path}'s weight map")
        if entry["tensor"] not in names:
            raise ValueError(f"tensor {w.name!r} holds checkpoint tensor {entry['tensor']!r} "
                             f"by the file's weight map, which {source} does not have")
        shape = source.shape(entry["tensor"])
        if tuple(shape) != (w.rows, w.cols):
            raise ValueError(f"{source}: tensor {entry['tensor']} has shape {list(shape)}; "
                             f"tensor {w.name!r} of the file is [{w.rows}, {w.cols}]")
        w.source, w.factor = entry["tensor"], float(entry["factor"])


def _row_abs_max(rows, count, cols):
    """max |value| of each of `count` rows, read `rows(start, stop)` a chunk at a time (no
    full-size temporary)."""
    step = max(1, _CHUNK_BYTES // (4 * cols))
    return np.concatenate([np.abs(rows(i, min(i + step, count))).max(axis=1)
                           for i in range(0, count, step)])
