"""Keep exported graphs on core TensorFlow ops that TensorFlow Serving runs well without XLA.

Keras' TensorFlow backend writes `keras.ops.slice_update` (the KV-cache update in
`Gemma2Attention`) as `XlaDynamicUpdateSlice`, an op that only runs through XLA. While the
serving functions are traced, `core_tf_slice_update()` swaps it for the core op
`TensorStridedSliceUpdate`, which computes the same dynamic update slice.

`small_batch_matmul()` writes the projections `x @ w.T` (w [out, in]) as `(w @ x.T).T`:
TensorFlow's own CPU kernel for `MatMul(transpose_b=True)` takes 20 to 25 times as long at
2 to 4 rows as at 1 (a 2B MLP weight: about 0.5 to 1 s against 20 to 40 ms), which a
batched decode step hits on every projection; `w @ x.T` stays within 2 to 4 times.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf


def strided_slice_update(inputs, start_indices, updates):
    """`inputs` with `updates` written at `start_indices` (one start per axis), core ops only."""
    inputs = tf.convert_to_tensor(inputs)
    updates = tf.cast(updates, inputs.dtype)
    begin = tf.stack([tf.cast(i, tf.int32) for i in start_indices])
    end = begin + tf.shape(updates, out_type=tf.int32)
    return tf.raw_ops.TensorStridedSliceUpdate(
        input=inputs, begin=begin, end=end, strides=tf.ones_like(begin), value=updates
    )


def require_tensorflow_backend():
    """Raise RuntimeError unless Keras runs on TensorFlow (the export traces the model)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "the SavedModel export needs the TensorFlow backend: set KERAS_BACKEND=tensorflow "
            f"before importing keras (current backend: {keras.backend.backend()})"
        )


def projection(x, w):
    """`x @ w.T` for `x` [..., in] and `w` [out, in], as `(w @ x.T).T` (2-D MatMuls)."""
    flat = tf.reshape(x, [-1, x.shape[-1]])
    y = tf.transpose(tf.matmul(w, flat, transpose_b=True))
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], tf.shape(w)[:1]], axis=0))


@contextlib.contextmanager
def small_batch_matmul():
    """Within the block, the model's projections trace to `projection`."""
    from gemma_keras import layers

    original = layers.matmul_transposed
    layers.matmul_transposed = projection
    try:
        yield
    finally:
        layers.matmul_transposed = original


@contextlib.contextmanager
def core_tf_slice_update():
    """Within the block, `keras.ops.slice_update` traces to `TensorStridedSliceUpdate`."""
    require_tensorflow_backend()
    from keras.src.backend.tensorflow import core as tf_core

    original = tf_core.slice_update
    tf_core.slice_update = strided_slice_update
    try:
        yield
    finally:
        tf_core.slice_update = original


@contextlib.contextmanager
def core_tf_kernels():
    """Both `core_tf_slice_update()` and `small_batch_matmul()`: trace for graphs run by
    TensorFlow's own kernels (no XLA)."""
    with core_tf_slice_update(), small_batch_matmul():
        yield
