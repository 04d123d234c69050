"""What a `.tflite` file holds: its operators, signatures and stored weight tensors.

Reads the flatbuffer with the schema `ai-edge-litert` ships (no TensorFlow, no interpreter),
so the checks of an export (builtin ops only, no resource variables, one embedding copy)
are cheap even for large files.

Example:
>>> info = TFLiteFileInfo("gemma.tflite")
>>> info.op_names()            # {'FULLY_CONNECTED', 'GATHER', ...}
>>> info.custom_ops()          # [] for a file the LiteRT interpreters run as is
"""

from __future__ import annotations

import dataclasses
import mmap
import os

from ai_edge_litert import schema_py_generated as schema

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
RESOURCE_VARIABLE_OPS = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"}


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """A constant tensor: where it is used and which buffer holds its bytes."""

    subgraph: str
    name: str
    shape: tuple
    dtype: str
    buffer: int
    nbytes: int


class TFLiteFileInfo:
    """Operators, signatures and constant tensors of one `.tflite` file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._model = schema.Model.GetRootAsModel(self._data, 0)
            self._model.Version()
        except Exception as e:  # flatbuffers raises plain errors on garbage
            raise ValueError(f"{self.path} is not a .tflite flatbuffer: {e}") from None

    @property
    def size(self) -> int:
        return len(self._data)

    def _op_codes(self):
        codes = []
        for i in range(self._model.OperatorCodesLength()):
            code = self._model.OperatorCodes(i)
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == schema.BuiltinOperator.CUSTOM:
                codes.append(f"CUSTOM:{(code.CustomCode() or b'').decode()}")
            else:
                codes.append(_OP_NAMES.get(builtin, str(builtin)))
        return codes

    def op_names(self) -> set:
        """Names of the operators used: builtins by name, custom ops as `CUSTOM:<name>`
        (TensorFlow's Flex ops are custom ops named `Flex...`)."""
        return set(self._op_codes())

    def custom_ops(self) -> list:
        """Custom (and Flex) operators: the interpreters run a file only without these."""
        return sorted(op for op in self.op_names() if op.startswith("CUSTOM:"))

    def signature_names(self) -> list:
        return [self._model.SignatureDefs(i).SignatureKey().decode()
                for i in range(self._model.SignatureDefsLength())]

    def _buffer_nbytes(self, index):
        buffer = self._model.Buffers(index)
        return buffer.DataLength() or int(buffer.Size())

    def stored_tensors(self, min_bytes=1) -> list:
        """Tensors with stored data of at least `min_bytes`, in every subgraph."""
        out = []
        for s in range(self._model.SubgraphsLength()):
            subgraph = self._model.Subgraphs(s)
            sg_name = (subgraph.Name() or b"").decode()
            for t in range(subgraph.TensorsLength()):
                tensor = subgraph.Tensors(t)
                nbytes = self._buffer_nbytes(tensor.Buffer()) if tensor.Buffer() else 0
                if nbytes >= min_bytes:
                    out.append(StoredTensor(
                        sg_name, tensor.Name().decode(), tuple(tensor.ShapeAsNumpy().tolist()),
                        _TYPE_NAMES.get(tensor.Type(), str(tensor.Type())), tensor.Buffer(),
                        nbytes))
        return out

    def buffers_of_shape(self, shape) -> set:
        """Distinct buffers holding a tensor of `shape` (e.g. the embedding's [vocab, hidden])."""
        shape = tuple(shape)
        return {t.buffer for t in self.stored_tensors() if t.shape == shape}

    def stored_bytes(self) -> int:
        """Bytes of all distinct constant buffers."""
        return sum(self._buffer_nbytes(b) for b in {t.buffer for t in self.stored_tensors()})

    def quantization_param_bytes(self) -> int:
        """Bytes of stored quantization parameters (a float32 scale and an int64 zero point
        per channel). ai-edge-quantizer repeats them in each subgraph for every tensor it
        reads; a table shared by several tensors (`requantize`'s per-channel int4) counts
        once."""
        total, seen = 0, set()
        for s in range(self._model.SubgraphsLength()):
            subgraph = self._model.Subgraphs(s)
            for t in range(subgraph.TensorsLength()):
                q = subgraph.Tensors(t).Quantization()
                if q is not None and q._tab.Pos not in seen:
                    seen.add(q._tab.Pos)
                    total += 4 * q.ScaleLength() + 8 * q.ZeroPointLength()
        return total

    def close(self):
        self._data.close()
