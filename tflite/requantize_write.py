"""Writing a requantized file: the rewritten flatbuffer, then every buffer at its offset.

Unchanged buffers are copied file to file by the kernel (`flatbuffer.TFLiteFile.copy_buffer`);
each requantized weight is read from its source a block of rows at a time (16 MB of float32),
checked against the int8 data it replaces, encoded (`weight_encoding`) and written, its block
scales right after it. The output keeps its buffers after the flatbuffer (16-byte aligned
offsets), so it may exceed 2 GB, and appears only when complete.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from gemma_keras.tflite.flatbuffer import write_with_offsets
from gemma_keras.tflite.weight_encoding import (
    ROUNDING_TOLERANCE,
    int8_rounding_error,
    quantize_channelwise,
    quantize_int4_blockwise,
)

_CHUNK_BYTES = 16 << 20


def write(out_path, file, model, weights, scales_buffers, source, block, progress=False):
    """Write `out_path` from the rewritten `model` of the open `file`: `weights`
    (`{buffer: requantize_plan.Weight}`) encoded from `source`, their block scales in
    `scales_buffers` (`{weight buffer: scales buffer}`), every other buffer copied."""

    order = _data_order(file, model, weights, scales_buffers, block)
    scales_of = {scales: weight for weight, scales in scales_buffers.items()}
    pending = {}  # weight buffer -> its block scales, written right after it
    bar = tqdm(total=len(weights), desc="requantize", unit="weight", disable=not progress)

    def write_buffer(f, index):
        if index in weights:
            pending[index] = _write_weight(f, file, weights[index], source, block)
            bar.update(1)
        elif index in scales_of:
            f.write(pending.pop(scales_of[index]).tobytes())
        else:
            file.copy_buffer(index, f)

    try:
        return write_with_offsets(out_path, model, order, write_buffer)
    finally:
        bar.close()


def _data_order(file, model, weights, scales_buffers, block):
    """`[(buffer, size)]` in file order: every stored buffer except the metadata ones (those
    stay in the flatbuffer), each int4 weight directly followed by its scales."""
    inline = {m.buffer for m in model.metadata or []}
    scales = set(scales_buffers.values())
    order = []
    for index in range(len(model.buffers)):
        if index in inline or index in scales:
            continue
        if index in weights:
            w = weights[index]
            order.append((index, w.rows * w.cols * w.bits // 8))
            if block:
                order.append((scales_buffers[index], w.rows * (w.cols // block) * 2))
        elif file.span(index)[1]:
            order.append((index, file.span(index)[1]))
    return order


def _write_weight(f, file, weight, source, block):
    """Write `weight`'s values to `f`, quantized chunk by chunk; return its block scales
    (None per channel: those are `weight.channel_scales`)."""
    rows_per_chunk = max(2, _CHUNK_BYTES // (4 * weight.cols) // 2 * 2)
    scales = []
    for start in range(0, weight.rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, weight.rows)
        if weight.int8:
            values = np.ascontiguousarray(weight.source_rows(source, start, stop), np.float32)
            _verify(file, weight, start, values)
        else:
            values = weight.stored_rows(file, start, stop)
        if block is None:
            f.write(quantize_channelwise(values, weight.channel_scales[start:stop],
                                         weight.bits).tobytes())
            continue
        packed, chunk_scales = quantize_int4_blockwise(values, block)
        f.write(packed.tobytes())
        scales.append(chunk_scales)
    return np.concatenate(scales) if scales else None


def _verify(file, weight, start, values):
    """Raise unless `values` (rows `start`...) round to the int8 data of `weight`: the file's
    weight map and the source agree."""
    q = file.read(weight.position + start * weight.cols, values.size, np.int8)
    steps = weight.scales[start:start + len(values), None]
    error = int8_rounding_error(values, q.reshape(values.shape), steps)
    if error.max() > ROUNDING_TOLERANCE:
        row = start + int(np.argmax(error.max(axis=1)))
        raise ValueError(f"checkpoint tensor {weight.source!r} does not hold the values of "
                         f"tensor {weight.name!r} at row {row}: off by {error.max() / 2:.3g} "
                         f"int8 steps (is it the checkpoint this file was exported from?)")
