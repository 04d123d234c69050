"""The graph edits of a requantization (on the `ModelT` of the file), as ai-edge-quantizer writes
its "dynamic" int4 recipes and per-channel int8:

- each weight tensor becomes INT4 (or INT8) with symmetric scales. Blockwise: a
  BlockwiseQuantization (block size, no zero points, quantized dimension 0) whose scales are
  a FLOAT16 tensor `<name>_scales` [rows, cols / block] in a new buffer, one per weight buffer.
  Per channel: one float32 scale per row in the tensor's quantization parameters (zero points
  0, quantized dimension 0), one table shared by every tensor of that weight;
- FULLY_CONNECTED at its float32 version with `asymmetric_quantize_inputs` off;
- a table GATHER (and the DEQUANTIZE after an int8 one) becomes one EMBEDDING_LOOKUP (version
  1) that outputs float32, as `quantize.gathers_to_embedding_lookups` does before
  ai-edge-quantizer runs;
- one operator code entry per operator, at the largest float32 version among its ops.
"""

from __future__ import annotations

import numpy as np

from gemma_keras.tflite import flatbuffer
from gemma_keras.tflite.flatbuffer import schema
from gemma_keras.tflite.requantize_plan import weight_input


def rewrite_graph(model, weights, block):
    """Retype `weights` (`{buffer: requantize_plan.Weight}`), add their scales, turn table
    GATHERs into EMBEDDING_LOOKUPs and fix the op codes. Returns `{weight buffer: scales
    buffer}` (empty per channel)."""
    scales_buffers = {}
    for w in weights.values():
        if block:
            scales_buffers[w.buffer] = len(model.buffers)
            model.buffers.append(schema.BufferT())
        for s, t in w.uses:
            _retype(model.subgraphs[s], t, scales_buffers.get(w.buffer), w, block)
    wanted = {}  # id(op) -> the builtin operator it becomes
    for subgraph in model.subgraphs:
        for op in list(subgraph.operators):
            _rewrite_op(model, subgraph, op, weights, wanted)
    _set_opcodes(model, wanted)
    return scales_buffers


def _retype(subgraph, index, scales_buffer, weight, block):
    tensor = subgraph.tensors[index]
    tensor.type = schema.TensorType.INT4 if weight.bits == 4 else schema.TensorType.INT8
    if block is None:
        tensor.quantization = _channel_quantization(weight)
        return
    q = schema.QuantizationParametersT()
    q.quantizedDimension = 0
    tensor.quantization = q
    scales = schema.TensorT()
    scales.name = tensor.name + b"_scales"
    scales.shape = [weight.rows, weight.cols // block]
    scales.type = schema.TensorType.FLOAT16
    scales.buffer = scales_buffer
    subgraph.tensors.append(scales)
    details = schema.BlockwiseQuantizationT()
    details.scales, details.zeroPoints, details.blockSize = len(subgraph.tensors) - 1, -1, block
    q.detailsType = schema.QuantizationDetails.BlockwiseQuantization
    q.details = details


def _channel_quantization(weight):
    """The per-channel quantization parameters of `weight`: one object for all its tensors
    (one per signature), written once into the file (the scales and zero points of the 2B's
    tensors would otherwise take 46 MB, 12 MB per signature)."""
    if weight.quantization is None:
        q = weight.quantization = _SharedQuantization()
        q.quantizedDimension = 0
        q.scale = weight.channel_scales
        q.zeroPoint = np.zeros(weight.rows, np.int64)
    return weight.quantization


class _SharedQuantization(schema.QuantizationParametersT):
    """QuantizationParametersT packed once per flatbuffer builder, so that every tensor
    holding the object points at the same table."""

    def Pack(self, builder):  # noqa: N802 (the flatbuffers object API's name)
        if getattr(self, "_builder", None) is not builder:
            self._builder, self._offset = builder, super().Pack(builder)
        return self._offset


def _rewrite_op(model, subgraph, op, weights, wanted):
    slot = weight_input(model, subgraph, op)
    if slot is None or op.inputs[slot] < 0:
        return
    if subgraph.tensors[op.inputs[slot]].buffer not in weights:
        return
    code = flatbuffer.builtin(model, op)
    if code == schema.BuiltinOperator.FULLY_CONNECTED:
        op.builtinOptions.asymmetricQuantizeInputs = False
        wanted[id(op)] = schema.BuiltinOperator.FULLY_CONNECTED
        return
    if code == schema.BuiltinOperator.GATHER:
        op.inputs = [int(op.inputs[1]), int(op.inputs[0])]
        op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.NONE, None
        _drop_dequantize(model, subgraph, op)
    wanted[id(op)] = schema.BuiltinOperator.EMBEDDING_LOOKUP


def _drop_dequantize(model, subgraph, op):
    """An int8 GATHER feeds one DEQUANTIZE; EMBEDDING_LOOKUP outputs its float32 directly
    (the int8 tensor between them stays in the list, read by nothing)."""
    out = int(op.outputs[0])
    if subgraph.tensors[out].type == schema.TensorType.FLOAT32:
        return
    readers = [o for o in subgraph.operators if out in [int(i) for i in o.inputs]]
    if (len(readers) != 1
            or flatbuffer.builtin(model, readers[0]) != schema.BuiltinOperator.DEQUANTIZE
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
    ops = [op for subgraph in model.subgraphs for op in subgraph.operators]
    for code in sorted(set(wanted.values())):
        group = [op for op in ops if wanted.get(id(op), flatbuffer.builtin(model, op)) == code]
        members = {id(op) for op in group}
        index = group[0].opcodeIndex
        if any(op.opcodeIndex == index and id(op) not in members for op in ops):
            index = len(model.operatorCodes)
            model.operatorCodes.append(schema.OperatorCodeT())
        entry = model.operatorCodes[index]
        entry.builtinCode, entry.deprecatedBuiltinCode = code, min(code, 127)
        entry.version = max(_float_version(code, op) for op in group)
        for op in group:
            op.opcodeIndex = index
    flatbuffer.drop_unused_opcodes(model)


def _float_version(code, op):
    """The version TFLite's op_version.cc gives this op with float32 input and weights, which
    ai-edge-quantizer keeps when it quantizes the weights (EMBEDDING_LOOKUP: 1)."""
    if code != schema.BuiltinOperator.FULLY_CONNECTED:
        return 1
    if len(op.inputs) == 2:
        return 6
    return 5 if op.builtinOptions.keepNumDims else 1
