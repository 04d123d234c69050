"""The weight map of a `route="converter"` export, recorded when the file is written.

TensorFlow's converter names each constant after the op that read it (`.../ReadVariableOp`,
`mul` for the stored table), so its file does not say which checkpoint tensor a weight
buffer holds. The exporter, which holds both the checkpoint and the file, records the link
once: each int8 weight is the one checkpoint tensor (times its factor) that rounds to it.
Then the file carries the same weight map as a lean export (`weight_map_metadata`), and
`requantize` finds every weight by name.
"""

from __future__ import annotations

import numpy as np

from gemma_keras.conventions import WEIGHT_MAP_METADATA
from gemma_keras.tflite import flatbuffer
from gemma_keras.tflite.requantize_plan import find_weights
from gemma_keras.tflite.weight_encoding import ROUNDING_TOLERANCE, int8_rounding_error
from gemma_keras.tflite.weight_map_metadata import encode_weight_map



def record_weight_map(int8_path, source, factors):
    """Add the weight map to the dynamic_int8 file `int8_path` (rewritten in place).

    `source`: a `weight_sources.WeightSource` of the checkpoint; `factors`: `{hf_name:
    factor}` of the tensors the graph stores scaled (the tied embedding). Each checkpoint
    tensor is loaded once and compared with every int8 weight of its shape at 512 fixed
    positions (`requantize` checks every value when it reads the weight). Raises ValueError
    naming the tensor when an int8 weight matches no checkpoint tensor, or several."""
    with flatbuffer.TFLiteFile(int8_path) as file:
        model = file.unpack()
        weights = [w for w in find_weights(file, model, None).values() if w.int8]
        samples = {w.buffer: _sample(file, w) for w in weights}
        matches = {w.buffer: [] for w in weights}
        for name in sorted(source.names()):
            candidates = [w for w in weights if (w.rows, w.cols) == tuple(source.shape(name))]
            if not candidates:
                continue
            values = source.read(name) * np.float32(factors.get(name, 1.0))
            for w in candidates:
                rows, cols, q = samples[w.buffer]
                error = int8_rounding_error(values[rows, cols], q, w.scales[rows])
                if np.all(error <= ROUNDING_TOLERANCE):
                    matches[w.buffer].append(name)
            del values
        for w in weights:
            if len(matches[w.buffer]) != 1:
                raise ValueError(f"{int8_path}: tensor {w.name!r} [{w.rows}, {w.cols}] rounds "
                                 f"to {len(matches[w.buffer])} checkpoint tensors "
                                 f"{matches[w.buffer]}; expected exactly one")
        entries = {w.buffer: (matches[w.buffer][0], factors.get(matches[w.buffer][0], 1.0))
                   for w in weights}
        flatbuffer.add_metadata(model, WEIGHT_MAP_METADATA,
                                encode_weight_map(entries, "dynamic_int8"))
        flatbuffer.rewrite_file(file, model, int8_path)


def _sample(file, weight, count=512):
    """(rows, cols, int8 values) at `count` fixed positions of `weight`."""
    rng = np.random.default_rng(weight.rows * 1_000_003 + weight.cols)
    flat = np.sort(rng.choice(weight.rows * weight.cols, min(count, weight.rows * weight.cols),
                              replace=False))
    rows, cols = flat // weight.cols, flat % weight.cols
    q = np.array([file.read(weight.position + int(p), 1, np.int8)[0] for p in flat])
    return rows, cols, q
