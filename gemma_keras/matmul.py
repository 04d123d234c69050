"""`x @ w.T` for weights stored [out, in], as the checkpoints and TFLite's FULLY_CONNECTED keep
them: the float product of the layers, and the int8 one of the quantized layers."""

from __future__ import annotations

import keras
from keras import ops


def matmul_transposed(x, w, output_type=None):
    """`x @ w.T` for `x` [..., in] and `w` [out, in], without materialising `w.T`.

    On TensorFlow this is one 2-D `MatMul(transpose_b=True)`, which XLA, oneDNN and the TFLite
    converter (FULLY_CONNECTED, whose weights are [out, in]) all take as it is; on JAX the
    transpose folds into the dot. `output_type="int32"` accumulates int8 operands in int32.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        flat = tf.reshape(x, [-1, x.shape[-1]])
        kwargs = {} if output_type is None else {"output_type": tf.as_dtype(output_type)}
        y = tf.matmul(flat, w, transpose_b=True, **kwargs)
        return tf.reshape(y, tf.concat([tf.shape(x)[:-1], tf.shape(w)[:1]], axis=0))
    return ops.matmul(x, ops.transpose(w))
