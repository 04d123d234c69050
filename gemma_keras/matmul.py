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
        blocks = _row_blocks(w)
        if len(blocks) == 1:  # the kernel itself, unsliced (what the TFLite converter reads)
            y = tf.matmul(flat, w, transpose_b=True, **kwargs)
        else:
            y = tf.concat([tf.matmul(flat, w[start:start + rows], transpose_b=True, **kwargs)
                           for start, rows in blocks], axis=-1)
        return tf.reshape(y, tf.concat([tf.shape(x)[:-1], tf.shape(w)[:1]], axis=0))
    return ops.matmul(x, ops.transpose(w))


# TensorFlow's CPU products widen a 16-bit float kernel to a float32 copy of the whole
# kernel: 2.2 GiB for the 2B's tied embedding, on top of the 1.1 GiB kernel. A kernel
# larger than this is multiplied in blocks of rows, so the widened copy is one block (the
# embedding in 36 blocks and the MLP kernels in 2; on 8 layers of the 2B's width, blocks of
# 2**26 left 0.43 GiB of such copies at the peak, blocks of 2**24 none that show).
WIDENED_BLOCK_ELEMENTS = 2**24  # 64 MiB in float32


def _row_blocks(w):
    """(first row, rows) of the blocks `w` is multiplied in: one block for float32 and int8
    kernels and for small 16-bit ones; blocks of at most WIDENED_BLOCK_ELEMENTS otherwise."""
    out_dim, in_dim = int(w.shape[0]), int(w.shape[1])
    if keras.backend.standardize_dtype(w.dtype) not in ("bfloat16", "float16"):
        return [(0, out_dim)]
    rows = max(1, WIDENED_BLOCK_ELEMENTS // in_dim)
    return [(start, min(rows, out_dim - start)) for start in range(0, out_dim, rows)]


def read_after(value, tensor):
    """`value`, read only once `tensor` exists (TensorFlow and JAX; elsewhere `value`).

    TensorFlow's executor runs an op as soon as its inputs are ready, and a loop runs up to
    ten iterations at once; XLA's scheduler (JAX) may also hoist an op on the weights alone
    to the start of the step. Without this order, the int8 backward pass dequantizes every
    layer's weights at its start (a float copy of the whole model), and a chunked loop
    computes several chunks together."""
    backend = keras.backend.backend()
    if backend == "jax":
        # XLA drops control dependencies and optimization barriers before it schedules, so
        # the order is a data dependency (as tf.recompute_grad makes under XLA): `value`
        # plus min(|t|, 0) = 0 for one element t of `tensor`, which XLA does not fold.
        import jax.numpy as jnp

        first = jnp.ravel(tensor)[:1].astype("float32")
        return value + jnp.minimum(jnp.abs(first), 0.0).astype(value.dtype).reshape(())
    if backend != "tensorflow":
        return value
    import tensorflow as tf

    with tf.control_dependencies([tensor]):
        return tf.identity(value)
