"""Stream a model's weights into a template `.tflite` file (`template.py`), tensor by tensor.

The template holds each weight matrix as a FILL of its placeholder value (a stored splat
constant on small models). This module turns each into a stored tensor shared by every
signature, as TensorFlow's converter stores a weight, and writes the file with the checkpoint's
values in one of the converter's own encodings:

- "none": float32;
- "fp16": the converter's float16 encoding, written from the float32 template: every stored
  float32 tensor (weights and the graph's own constants) in float16 behind a DEQUANTIZE
  (`float16_constants.py`);
- "dynamic_int8": the converter's dynamic-range int8: symmetric, one float32 scale per tensor
  (max |w| / 127), FULLY_CONNECTED at version 9 with `asymmetric_quantize_inputs`, and each
  table GATHER reading int8 rows into a DEQUANTIZE.

The other quantizations start from the "dynamic_int8" file (`requantize.py`). Which checkpoint
tensor each stored weight holds is recorded in the file's metadata `gemma_keras_weights`
(`weight_map_metadata.read_weight_map`), so later passes find weights by name, not by value.

Memory: one block of rows of one weight at a time (16 MB of float32), plus the template;
the output keeps its buffers after the flatbuffer (16-byte aligned offsets), like the
converter's large-model files, and is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gemma_keras.conventions import WEIGHT_MAP_METADATA
from gemma_keras.tflite import flatbuffer
from gemma_keras.tflite.flatbuffer import TFLiteFile, is_stored, schema, write_with_offsets
from gemma_keras.tflite.float16_constants import dequantize_constants, to_float16
from gemma_keras.tflite.template import table_value
from gemma_keras.tflite.weight_encoding import int8_step, quantize_int8_per_tensor
from gemma_keras.tflite.weight_map_metadata import encode_weight_map

ENCODINGS = ("none", "fp16", "dynamic_int8")
_CHUNK_BYTES = 16 << 20
# The versions TensorFlow's converter gives the ops it quantizes in "dynamic_int8" (from
# TFLite's op_version.cc: hybrid FULLY_CONNECTED with asymmetric inputs, int8 GATHER and
# DEQUANTIZE).
_INT8_VERSIONS = {"FULLY_CONNECTED": 9, "GATHER": 2, "DEQUANTIZE": 2}


@dataclasses.dataclass
class StoredWeight:
    """One weight matrix of the file: its checkpoint tensor, stored buffer and readers."""

    name: str  # the checkpoint (Hugging Face) tensor name
    factor: float  # the graph stores `factor * checkpoint values`
    buffer: int
    shape: tuple
    uses: list = dataclasses.field(default_factory=list)  # (subgraph, tensor index)
    scale: float | None = None  # "dynamic_int8": the tensor's int8 step
    peak: float | None = None  # "dynamic_int8": max |w|


def write_weights(template_path, placeholders, source, encoding, out_path, progress=False):
    """Write `out_path`: the template `template_path` with `source`'s weights in `encoding`.

    `placeholders`: `{hf_name: template.Placeholder}` the template was traced with;
    `source`: a `weight_sources.WeightSource`. Returns the output path. Raises ValueError
    when a placeholder is missing from the template or a weight from the source.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}")
    out_path = Path(out_path)
    with TFLiteFile(template_path) as template:
        model = template.unpack()
        weights, splats = _find_placeholders(template, model, placeholders)
        _store_weights(model, weights)
        if encoding == "dynamic_int8":
            for weight in weights.values():
                weight.scale = _int8_scale(source, weight)
            _quantize_int8(model, weights)
        referenced = _drop_unused(model)
        stored = _stored_buffers(template, model, referenced, weights, splats)
        halved = set()
        if encoding == "fp16":
            halved = dequantize_constants(model, set(stored))
            for buffer in halved & set(splats):
                value, count = splats[buffer]
                splats[buffer] = (to_float16(np.frombuffer(value, np.float32)).tobytes(), count)
        _add_weight_map(model, weights, encoding)
        _write(out_path, template, model, stored, halved, weights, splats, source, encoding,
               progress)
    return out_path


# ------------------------------------------------------------------ finding placeholders
def _find_placeholders(template, model, placeholders):
    """`({hf_name: StoredWeight}, {buffer: (value bytes, count)})`: the weights the template's
    FILL ops (or splat buffers) stand for, and the other constant FILLs, which become stored
    splats as the converter would have stored them."""
    by_value = {np.float32(table_value(p)).tobytes(): p for p in placeholders.values()}
    weights, splats = {}, {}
    fill = schema.BuiltinOperator.FILL
    for s, subgraph in enumerate(model.subgraphs):
        for op in list(subgraph.operators):
            if flatbuffer.builtin(model, op) != fill:
                continue
            shape_t, value_t = (subgraph.tensors[i] for i in op.inputs)
            if not (is_stored(model, shape_t) and is_stored(model, value_t)):
                continue  # a FILL of a computed shape or value: part of the graph
            out = int(op.outputs[0])
            value = None
            if value_t.type == schema.TensorType.FLOAT32:
                value = _read_value(template, value_t, np.float32)
            p = by_value.get(value.tobytes()) if value is not None else None
            subgraph.operators.remove(op)
            if p is None:  # a large splat constant of the graph itself
                buffer = subgraph.tensors[out].buffer
                splats[buffer] = (template.read(*template.span(value_t.buffer),
                                                np.uint8).tobytes(),
                                  int(np.prod(subgraph.tensors[out].shape)))
                continue
            _add_use(weights, p, subgraph.tensors[out], (s, out))
        for t, tensor in enumerate(subgraph.tensors):  # small weights stay stored splats
            if (tensor.type != schema.TensorType.FLOAT32 or not is_stored(model, tensor)
                    or len(tensor.shape) != 2):
                continue
            position, nbytes = template.span(tensor.buffer)
            first = template.read(position, 1, np.float32)
            p = by_value.get(first.tobytes())
            if p is not None and tuple(tensor.shape) == p.shape:
                if np.any(template.read(position, nbytes // 4, np.float32) != first):
                    continue
                _add_use(weights, p, tensor, (s, t))
    missing = sorted(set(placeholders) - set(weights))
    if missing:
        raise ValueError(f"{template.path}: the template has no tensor for {missing}")
    return weights, splats


def _add_use(weights, placeholder, tensor, use):
    if tuple(int(d) for d in tensor.shape) != placeholder.shape:
        raise ValueError(f"the placeholder of {placeholder.name} has shape "
                         f"{list(tensor.shape)}, expected {list(placeholder.shape)}")
    weight = weights.get(placeholder.name)
    if weight is None:
        weight = weights[placeholder.name] = StoredWeight(
            placeholder.name, placeholder.factor, tensor.buffer, placeholder.shape)
    weight.uses.append(use)


def _read_value(template, tensor, dtype):
    position, nbytes = template.span(tensor.buffer)
    return template.read(position, 1, dtype) if nbytes == np.dtype(dtype).itemsize else None


# ------------------------------------------------------------------ rewriting the graph
def _store_weights(model, weights):
    """Every use of a weight reads one buffer through one tensor per subgraph (the template
    may hold a FILL per reader), named after its checkpoint tensor (suffixed `_<subgraph>`
    after the first subgraph: ai-edge-quantizer needs names unique in the file)."""
    for weight in weights.values():
        first = {}
        for s, t in weight.uses:
            first.setdefault(s, t)
        for s, t in weight.uses:
            tensor = model.subgraphs[s].tensors[t]
            tensor.buffer = weight.buffer
            tensor.name = (weight.name if s == min(first) else f"{weight.name}_{s}").encode()
            if t != first[s]:
                for op in model.subgraphs[s].operators:
                    op.inputs = [first[s] if int(i) == t else int(i) for i in op.inputs]
        weight.uses = sorted(first.items())


def _int8_scale(source, weight):
    """The converter's per-tensor int8 step, max |w| / 127 (stored as float32); sets
    `weight.peak`, max |w|."""
    peak = np.float32(0)
    for values in _blocks(source, weight):
        peak = max(peak, np.float32(np.abs(values).max()))
    weight.peak = float(peak)
    return int8_step(peak)


def _quantize_int8(model, weights):
    """Retype the weights to int8 and rewrite their readers as the converter's
    "dynamic_int8" conversion writes them."""
    buffers = {w.buffer: w for w in weights.values()}
    for weight in weights.values():
        for s, t in weight.uses:
            tensor = model.subgraphs[s].tensors[t]
            tensor.type = schema.TensorType.INT8
            tensor.quantization = _per_tensor(weight.scale)
    wanted = {}
    for subgraph in model.subgraphs:
        for op in list(subgraph.operators):
            code = flatbuffer.builtin(model, op)
            inputs = [int(i) for i in op.inputs]
            ops = schema.BuiltinOperator
            if code == ops.FULLY_CONNECTED and subgraph.tensors[inputs[1]].buffer in buffers:
                op.builtinOptions.asymmetricQuantizeInputs = True
                wanted[id(op)] = "FULLY_CONNECTED"
            elif code == ops.GATHER and subgraph.tensors[inputs[0]].buffer in buffers:
                table = subgraph.tensors[inputs[0]]
                _dequantize_output(model, subgraph, op, table)
                wanted[id(op)] = "GATHER"
    _set_versions(model, wanted)


def _per_tensor(scale):
    q = schema.QuantizationParametersT()
    q.scale, q.zeroPoint, q.quantizedDimension = [scale], [0], 0
    return q


def _dequantize_output(model, subgraph, op, table):
    """GATHER of an int8 table outputs int8 rows; a DEQUANTIZE after it gives the float32
    tensor the graph reads."""
    out = int(op.outputs[0])
    rows = schema.TensorT()
    float_rows = subgraph.tensors[out]
    rows.name, rows.shape, rows.type = float_rows.name, list(float_rows.shape), table.type
    rows.quantization = _per_tensor(table.quantization.scale[0])
    rows.buffer = len(model.buffers)
    model.buffers.append(schema.BufferT())
    subgraph.tensors.append(rows)
    op.outputs = [len(subgraph.tensors) - 1]
    dequantize = schema.OperatorT()
    dequantize.opcodeIndex = flatbuffer.opcode_index(model, schema.BuiltinOperator.DEQUANTIZE)
    dequantize.inputs, dequantize.outputs = [len(subgraph.tensors) - 1], [out]
    subgraph.operators.insert(subgraph.operators.index(op) + 1, dequantize)


def _set_versions(model, wanted):
    """One op code per operator, at the version its quantized form needs."""
    kinds = set(wanted.values()) | ({"DEQUANTIZE"} if "GATHER" in wanted.values() else set())
    for code in model.operatorCodes:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        for name in kinds:
            if builtin == getattr(schema.BuiltinOperator, name):
                code.version = max(code.version, _INT8_VERSIONS[name])


def _drop_unused(model):
    """Drop op codes no op uses, tensors no op, input or output reads (the FILLs' shapes and
    values), and the data of buffers no tensor points at."""
    flatbuffer.drop_unused_opcodes(model)
    for s, subgraph in enumerate(model.subgraphs):
        used = {int(i) for op in subgraph.operators for i in list(op.inputs) + list(op.outputs)
                if i >= 0}
        used |= {int(i) for i in subgraph.inputs} | {int(i) for i in subgraph.outputs}
        keep = [t for t in range(len(subgraph.tensors)) if t in used]
        index = {old: new for new, old in enumerate(keep)}
        subgraph.tensors = [subgraph.tensors[t] for t in keep]
        for op in subgraph.operators:
            op.inputs = [index[int(i)] if i >= 0 else -1 for i in op.inputs]
            op.outputs = [index[int(i)] for i in op.outputs]
        subgraph.inputs = [index[int(i)] for i in subgraph.inputs]
        subgraph.outputs = [index[int(i)] for i in subgraph.outputs]
        for signature in model.signatureDefs or []:
            if signature.subgraphIndex == s:
                for entry in list(signature.inputs or []) + list(signature.outputs or []):
                    entry.tensorIndex = index[int(entry.tensorIndex)]
    referenced = {t.buffer for sg in model.subgraphs for t in sg.tensors}
    referenced |= {m.buffer for m in model.metadata or []}
    for i, buffer in enumerate(model.buffers):
        if i not in referenced:
            buffer.data, buffer.offset, buffer.size = None, 0, 0
    return referenced


def _add_weight_map(model, weights, encoding):
    entries = {w.buffer: (w.name, w.factor) for w in weights.values()}
    flatbuffer.add_metadata(model, WEIGHT_MAP_METADATA, encode_weight_map(entries, encoding))


# ------------------------------------------------------------------ writing
def _blocks(source, weight):
    """The graph's values of `weight` (checkpoint rows times its factor), float32, in blocks."""
    rows, cols = weight.shape
    step = max(1, _CHUNK_BYTES // (4 * cols))
    for start in range(0, rows, step):
        values = source.rows(weight.name, start, min(start + step, rows))
        if weight.factor != 1.0:
            values = values * np.float32(weight.factor)
        yield values


def _encoded_blocks(source, weight, encoding):
    for values in _blocks(source, weight):
        if encoding == "fp16":
            yield to_float16(values)
        elif encoding == "dynamic_int8":
            yield quantize_int8_per_tensor(values, weight.peak)
        else:
            yield values


def _weight_nbytes(weight, encoding):
    itemsize = {"none": 4, "fp16": 2, "dynamic_int8": 1}[encoding]
    return int(np.prod(weight.shape)) * itemsize


def _stored_buffers(template, model, referenced, weights, splats):
    """The buffers the output stores data in, in file order: the weights, the splats and the
    template's own constants (not the metadata, which stays in the flatbuffer)."""
    inline = {m.buffer for m in model.metadata or []}
    own = {w.buffer for w in weights.values()} | set(splats)
    in_template = template.root.BuffersLength()
    return [index for index in range(len(model.buffers))
            if index in referenced and index not in inline
            and (index in own or (index < in_template and template.span(index)[1]))]


def _write(out_path, template, model, stored, halved, weights, splats, source, encoding,
           progress):
    """Write the file: `stored` buffers in order, those of `halved` (the template's float32
    constants in "fp16") converted to float16."""
    by_buffer = {w.buffer: w for w in weights.values()}
    order = []
    for index in stored:
        if index in by_buffer:
            order.append((index, _weight_nbytes(by_buffer[index], encoding)))
        elif index in splats:
            value, count = splats[index]
            order.append((index, len(value) * count))
        else:
            size = template.span(index)[1]
            order.append((index, size // 2 if index in halved else size))
    bar = tqdm(total=len(weights), desc=f"weights ({encoding})", unit="tensor",
               disable=not progress)

    def write_buffer(f, index):
        if index in by_buffer:
            for block in _encoded_blocks(source, by_buffer[index], encoding):
                f.write(block.tobytes())
            bar.update(1)
        elif index in splats:
            value, count = splats[index]
            f.write(value * count)
        elif index in halved:
            f.write(to_float16(np.frombuffer(template.buffer_bytes(index), np.float32)).tobytes())
        else:
            template.copy_buffer(index, f)

    try:
        write_with_offsets(out_path, model, order, write_buffer)
    finally:
        bar.close()
