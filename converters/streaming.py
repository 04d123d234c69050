"""Moving weights into and out of Keras variables without holding a model twice.

- `zeros_initializers()`: layers built inside it start their variables at zeros instead of
  running their random initializers (at 2B in bfloat16 the random initializers take minutes
  and a float32 temporary per tensor; zeros take a second and no temporary).
  `Gemma2CausalLM.empty(config, dtype)` builds a model to be filled that way.
- `assign_rows(variable, start, rows)` writes a block of rows into a variable in place (on the
  TensorFlow backend, an XLA dynamic-update-slice; `variable.assign` of a whole 1.2 GB
  embedding makes two temporary copies, and a scatter leaves the variable copying itself on
  every later read).
- `variable_rows(variable, start, stop)` reads a block of rows back as numpy (a dense slice:
  a gather, like a scatter, would leave the variable copying itself on every read).
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import keras
import numpy as np

from gemma_keras.converters.safetensors_io import numpy_dtype

# Rows per block when streaming a large tensor: the 256000 x 2304 embedding moves in blocks of
# about 64 MB (bfloat16) instead of one 1.2 GB piece.
BLOCK_BYTES = 64 * 2**20


def rows_per_block(shape, itemsize) -> int:
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize if len(shape) > 1 else itemsize
    return max(1, BLOCK_BYTES // max(row_bytes, 1))


@contextlib.contextmanager
def zeros_initializers():
    """Within the block, every `Layer.add_weight` starts its variable at zeros."""
    original = keras.layers.Layer.add_weight
    signature = inspect.signature(original)

    def add_weight(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["initializer"] = "zeros"
        return original(*bound.args, **bound.kwargs)

    keras.layers.Layer.add_weight = add_weight
    try:
        yield
    finally:
        keras.layers.Layer.add_weight = original


def assign_rows(variable, start: int, rows: np.ndarray):
    """Write `rows` into `variable[start : start + len(rows)]` in place."""
    rows = np.asarray(rows, dtype=numpy_dtype(keras.backend.standardize_dtype(variable.dtype)))
    if start == 0 and rows.shape[0] == variable.shape[0]:
        variable.assign(rows)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        _tf_row_writer()(variable.value, tf.constant(rows), tf.constant(start, tf.int32))
    else:
        variable.assign(keras.ops.slice_update(
            variable.value, (start,) + (0,) * (rows.ndim - 1), rows))


@functools.lru_cache(maxsize=None)
def _tf_row_writer():
    """`write(tf_variable, rows, start)`: rows written in place by an XLA dynamic-update-slice.

    Not a scatter: `scatter_update` (and a sliced `assign`) put a TensorFlow variable in
    copy-on-read mode for good, and every later read outside XLA (a training step without
    XLA, a bfloat16 generation step, an export reading rows back) then copies the whole
    variable: 2.4 GB per read of the 2B's float32 embedding.
    """
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    # Few traces (XLA still compiles once per shape, without Python). The corner is built
    # from the runtime shape: after rows of two ranks, the trace is of unknown rank.
    @tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
    def write(variable, rows, start):
        corner = tf.concat([[start], tf.zeros_like(tf.shape(rows))[1:]], axis=0)
        variable.assign(xla.dynamic_update_slice(variable.read_value(), rows, corner))

    return write


def variable_rows(variable, start: int, stop: int) -> np.ndarray:
    """`variable[start:stop]` as a numpy array (only those rows are copied).

    On TensorFlow a dense slice, never a gather: a gather (like a scatter) puts the variable in
    copy-on-read mode for good. On JAX, a slice of its host view: a jitted slice would
    compile for every block."""
    if keras.backend.backend() == "jax":
        return np.array(np.asarray(variable.value)[start:stop])
    return keras.ops.convert_to_numpy(variable.value[start:stop])
