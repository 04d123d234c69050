"""Where the TFLite export reads each weight from: one checkpoint tensor at a time, in rows.

The lean export (`template.py`, `weight_writer.py`) converts the graph without its weights and
then streams each weight into the file from one of these sources, named by its Hugging Face
tensor name (`converters.weight_map`):

- `KerasModelSource`: a `Gemma2CausalLM` in memory (its variables);
- `SafetensorsSource`: a Hugging Face directory, through the converters' lazy reader;
- `KerasDirSource`: a gemma-keras model directory, its `.weights.h5` datasets read in rows
  with h5py (where Keras' own saving put each variable);
- `ArraySource`: `{hf_name: array or zero-argument callable}` (requantize's `weights`, the
  exporter's SavedModel checkpoint), one tensor loaded at a time.

Every source returns float32 rows; bfloat16 and float16 checkpoints are widened a block at a
time, so no source holds more than one block of one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np

from gemma_keras.converters.safetensors_io import SafetensorsCheckpoint


class WeightSource:
    """`{hf_name: shape}` and `rows(name, start, stop)` -> float32 [stop - start, ...]."""

    shapes: dict

    def rows(self, name, start, stop):
        raise NotImplementedError

    def read(self, name):
        """The whole tensor `name` as float32."""
        return self.rows(name, 0, self.shape(name)[0])

    def names(self):
        return set(self.shapes)

    def shape(self, name):
        return tuple(self.shapes[name])

    def check(self, specs):
        """Raise ValueError naming every tensor of `specs` missing here or misshapen."""
        problems = []
        for spec in specs:
            shape = self.shapes.get(spec.hf_name)
            if shape is None:
                problems.append(f"{spec.hf_name} is missing")
            elif tuple(shape) != tuple(spec.hf_shape):
                problems.append(f"{spec.hf_name} has shape {tuple(shape)}, expected "
                                f"{tuple(spec.hf_shape)}")
        if problems:
            raise ValueError(f"{self}: " + "; ".join(problems))


def _float32(block, name, where):
    block = np.asarray(block)
    if block.dtype.kind not in "fV" and block.dtype.name != "bfloat16":
        raise ValueError(f"{where}: tensor {name} holds {block.dtype} values; expected floats")
    return np.asarray(block, np.float32)


class KerasModelSource(WeightSource):
    """The weights of a `Gemma2CausalLM` held in memory."""

    def __init__(self, model, specs):
        self.variables = {s.hf_name: s.variable for s in specs}
        self.shapes = {name: tuple(v.shape) for name, v in self.variables.items()}

    def rows(self, name, start, stop):
        from gemma_keras.converters.streaming import variable_rows

        return _float32(variable_rows(self.variables[name], start, stop), name, "the model")

    def __str__(self):
        return "the Keras model"


class SafetensorsSource(WeightSource):
    """A Hugging Face checkpoint directory, read lazily (`SafetensorsCheckpoint`)."""

    def __init__(self, directory):
        self.checkpoint = SafetensorsCheckpoint(directory)
        self.shapes = dict(self.checkpoint.shapes)

    def rows(self, name, start, stop):
        return _float32(self.checkpoint.read(name, slice(start, stop)), name,
                        self.checkpoint.files[name])

    def __str__(self):
        return str(self.checkpoint.directory)


class KerasDirSource(WeightSource):
    """A gemma-keras model directory: each variable's dataset in its `.weights.h5` file(s).

    Which dataset holds which variable is asked of Keras' own saving code (`_save_state` with
    a store that records paths instead of writing), on `model`, a weightless model of the
    directory's config.
    """

    def __init__(self, directory, model, specs):
        from gemma_keras.converters.keras_dir import SHARDED_WEIGHTS, read_metadata

        self.directory = Path(directory)
        weights = read_metadata(self.directory).get("weights", "model.weights.h5")
        paths = _keras_weight_paths(model)
        index = None
        if weights == SHARDED_WEIGHTS:
            index = json.loads((self.directory / weights).read_text())["weight_map"]
        self.datasets, self.shapes = {}, {}
        for spec in specs:
            path = paths[id(spec.variable)]
            group, _, key = path.rpartition("/")
            file = self.directory / (index.get(f"/{group}", index.get(group)) if index
                                     else weights)
            self.datasets[spec.hf_name] = (file, path)
            self.shapes[spec.hf_name] = tuple(spec.variable.shape)

    def rows(self, name, start, stop):
        file, path = self.datasets[name]
        with h5py.File(file, "r") as f:
            if path not in f:
                raise ValueError(f"{file}: no dataset {path} (tensor {name})")
            dataset = f[path]
            block = dataset[start:stop]
            if dataset.attrs.get("dtype") == "bfloat16":
                block = block.view(ml_dtypes.bfloat16)
        return _float32(block, name, file)

    def __str__(self):
        return str(self.directory)


class ArraySource(WeightSource):
    """`{hf_name: float array, or a zero-argument callable returning one}`: a callable is
    called when its tensor is first read, and the array kept until another one is read (one
    tensor in memory at a time)."""

    def __init__(self, arrays, where="weights"):
        self.arrays, self.where = dict(arrays), where
        self.shapes = {n: tuple(np.shape(a)) for n, a in self.arrays.items() if not callable(a)}
        self._loaded = (None, None)

    def names(self):
        return set(self.arrays)

    def shape(self, name):
        return tuple(self.shapes[name]) if name in self.shapes else self._load(name).shape

    def _load(self, name):
        if self._loaded[0] != name:
            self._loaded = (None, None)
            value = self.arrays[name]
            try:
                array = np.asarray(value() if callable(value) else value)
            except Exception as e:
                raise ValueError(f"{self.where}[{name!r}] could not be loaded: {e}") from e
            if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
                raise ValueError(f"{self.where}[{name!r}] holds {array.dtype} values; expected "
                                 f"floats")
            self._loaded = (name, np.asarray(array, np.float32))
            self.shapes[name] = self._loaded[1].shape
        return self._loaded[1]

    def rows(self, name, start, stop):
        return self._load(name)[start:stop]

    def __str__(self):
        return f"`{self.where}`"


def _keras_weight_paths(model):
    """`{id(variable): "<object path>/vars/<i>"}`: where `model.save_weights` puts each
    variable, from Keras' own walk over the model (nothing is read or written)."""
    from keras.src.saving import saving_lib

    paths = {}

    class _Recorder(dict):
        def __init__(self, path):
            super().__init__()
            self.path = path

        def __setitem__(self, key, value):
            paths[id(value)] = f"{self.path}/{key}"

    class _Store(saving_lib.NpzIOStore):  # Keras accepts only its own store types
        def __init__(self):
            pass

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            return _Recorder(f"{path}/vars" if path else "vars")

    saving_lib._save_state(model, weights_store=_Store(), assets_store=None, inner_path="",
                           visited_saveables=set())
    return paths
