"""Keep exported graphs on core TensorFlow ops that TensorFlow Serving runs without XLA.

Keras' TensorFlow backend writes `keras.ops.slice_update` (the KV-cache update in
`Gemma2Attention`) as `XlaDynamicUpdateSlice`, an op that only runs through XLA. While the
serving functions are traced, `core_tf_slice_update()` swaps it for the core op
`TensorStridedSliceUpdate`, which computes the same dynamic update slice.
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
