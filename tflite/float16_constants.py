"""TensorFlow's converter's float16 encoding ("fp16"), applied to a float32 graph.

With `supported_types=[tf.float16]` the converter stores every float32 constant of the graph
(weights, norm scales, scalars alike) as a FLOAT16 tensor and reads it through one DEQUANTIZE
(version 3) per constant and subgraph, placed before the subgraph's other operators, whose
float32 output every former reader now reads. Each value is clamped to +-65504 (the largest
float16) and rounded to the nearest float16, ties to even (its `Eigen::half` cast), so a
masking constant such as -1e30 becomes -65504 rather than -inf.

`weight_writer.py` writes the "fp16" file from the float32 template this way, so the export
converts one template for every mode.
"""

from __future__ import annotations

import numpy as np

from gemma_keras.tflite import flatbuffer
from gemma_keras.tflite.flatbuffer import schema

FLOAT16_MAX = 65504.0
_DEQUANTIZE_FLOAT16_VERSION = 3  # TFLite's op_version.cc: DEQUANTIZE of a float16 input


def to_float16(values):
    """float32 `values` as the converter stores them in float16: clamped, rounded to even."""
    return np.clip(np.asarray(values, np.float32), -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)


def dequantize_constants(model, stored):
    """Retype to FLOAT16 every FLOAT32 tensor of `model` (a `ModelT`) whose buffer is in
    `stored` (the buffers that hold data), each read through a new DEQUANTIZE at the top of
    its subgraph. Returns the set of buffers whose values must now be written in float16."""
    code = flatbuffer.opcode_index(model, schema.BuiltinOperator.DEQUANTIZE)
    entry = model.operatorCodes[code]
    entry.version = max(entry.version, _DEQUANTIZE_FLOAT16_VERSION)
    halved = set()
    for subgraph in model.subgraphs:
        replaced, dequantize_ops = {}, []
        for t, tensor in enumerate(list(subgraph.tensors)):
            if tensor.type != schema.TensorType.FLOAT32 or tensor.buffer not in stored:
                continue
            tensor.type = schema.TensorType.FLOAT16
            halved.add(tensor.buffer)
            replaced[t] = _float32_twin(model, subgraph, tensor)
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = code, [t], [replaced[t]]
            dequantize_ops.append(op)
        for op in subgraph.operators:
            op.inputs = [replaced.get(int(i), int(i)) for i in op.inputs]
        subgraph.operators = dequantize_ops + list(subgraph.operators)
    shared = halved & {t.buffer for sg in model.subgraphs for t in sg.tensors
                       if t.type != schema.TensorType.FLOAT16}
    if shared:
        raise ValueError(f"buffers {sorted(shared)} hold float32 constants and tensors of "
                         f"another type: they cannot be stored in float16")
    return halved


def _float32_twin(model, subgraph, tensor):
    """Append the float32 activation a DEQUANTIZE of `tensor` writes; returns its index."""
    twin = schema.TensorT()
    twin.name = tensor.name + b"_dequantized"
    twin.shape, twin.shapeSignature = list(tensor.shape), tensor.shapeSignature
    twin.type = schema.TensorType.FLOAT32
    twin.buffer = len(model.buffers)
    model.buffers.append(schema.BufferT())
    subgraph.tensors.append(twin)
    return len(subgraph.tensors) - 1
