"""What a `.tflite` file holds: its operators, signatures and stored weight tensors.

Reads the flatbuffer's tables (`flatbuffer.TFLiteFile`: no TensorFlow, no interpreter, no
weight buffer touched), so the checks of an export (builtin ops only, no resource variables,
one embedding copy) are cheap even for large files.

Example:
>>> info = TFLiteFileInfo("gemma.tflite")
>>> info.op_names()            # {'FULLY_CONNECTED', 'GATHER', ...}
>>> info.custom_ops()          # [] for a file the LiteRT interpreters run as is
"""

from __future__ import annotations

from gemma_keras.tflite.flatbuffer import StoredTensor, TFLiteFile  # noqa: F401 (public)

RESOURCE_VARIABLE_OPS = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"}


class TFLiteFileInfo(TFLiteFile):
    """Operators, signatures and constant tensors of one `.tflite` file (`TFLiteFile`'s
    readers, plus the checks the export's tests and benchmarks make)."""

    def custom_ops(self) -> list:
        """Custom (and Flex) operators: the interpreters run a file only without these."""
        return sorted(op for op in self.op_names() if op.startswith("CUSTOM:"))

    def buffers_of_shape(self, shape) -> set:
        """Distinct buffers holding a tensor of `shape` (e.g. the embedding's [vocab, hidden])."""
        shape = tuple(shape)
        return {t.buffer for t in self.stored_tensors() if t.shape == shape}
