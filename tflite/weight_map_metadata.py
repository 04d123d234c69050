"""The weight map a `.tflite` export records: which checkpoint tensor each stored weight
buffer holds, so that later passes (`requantize`) find each weight by name, never by value.

Stored as the file's metadata entry `conventions.WEIGHT_MAP_METADATA`, JSON:
`{"encoding": "dynamic_int8", "buffers": {"<buffer index>": {"tensor": hf_name,
"factor": f}}}`, where the buffer holds `f * checkpoint values` (`f` is
`conventions.stored_table_scale` for the tied embedding, 1 otherwise) in that encoding.
"""

from __future__ import annotations

import json

import numpy as np

from gemma_keras.conventions import WEIGHT_MAP_METADATA, stored_table_scale
from gemma_keras.tflite.flatbuffer import TFLiteFile

EMBEDDING = "model.embed_tokens.weight"  # the tied table's checkpoint tensor


def stored_factors(config):
    """`{hf_name: factor}` of the checkpoint tensors the export graph stores multiplied by a
    factor (a float32 value): the tied embedding, by `conventions.stored_table_scale`."""
    return {EMBEDDING: float(np.float32(stored_table_scale(config)))}


def encode_weight_map(entries, encoding):
    """The metadata bytes of `{buffer: (hf_name, factor)}` for a file in `encoding`."""
    record = {"encoding": encoding,
              "buffers": {str(buffer): {"tensor": name, "factor": factor}
                          for buffer, (name, factor) in sorted(entries.items())}}
    return json.dumps(record, separators=(",", ":")).encode()


def read_weight_map(file):
    """`{buffer index: {"tensor": hf_name, "factor": f}}` recorded in `file` (a path or an
    open `flatbuffer.TFLiteFile`), or None for a file written without it."""
    if not isinstance(file, TFLiteFile):
        with TFLiteFile(file) as opened:
            return read_weight_map(opened)
    data = file.metadata(WEIGHT_MAP_METADATA)
    if data is None:
        return None
    return {int(k): v for k, v in json.loads(data)["buffers"].items()}
