"""Gemma 2's building blocks: projections, RMSNorm, rotary embedding, tied embedding, soft-cap."""

from __future__ import annotations

import keras
from keras import ops

_PACKAGE = "gemma_keras"


def soft_cap(x, cap):
    """Gemma 2's logit soft-cap: `cap * tanh(x / cap)` (identity when cap is None)."""
    if cap is None:
        return x
    return ops.tanh(x / cap) * cap


def apply_rope(x, positions, theta):
    """Rotate `x` [batch, seq, heads, head_dim] by RoPE at integer `positions` [batch, seq].

    The angles are computed in float32 (as transformers does) and the rotation pairs the
    first and second halves of each head ("rotate_half" layout).
    """
    head_dim = x.shape[-1]
    exponents = ops.arange(0, head_dim, 2, dtype="float32") / head_dim
    inverse_freq = 1.0 / ops.power(ops.cast(theta, "float32"), exponents)
    angles = ops.cast(positions, "float32")[..., None] * inverse_freq  # [b, s, d/2]
    angles = ops.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, s, 1, d]
    cos = ops.cast(ops.cos(angles), x.dtype)
    sin = ops.cast(ops.sin(angles), x.dtype)
    first, second = ops.split(x, 2, axis=-1)
    rotated = ops.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin


def matmul_transposed(x, w):
    """`x @ w.T` for `x` [..., in] and `w` [out, in], without materialising `w.T`.

    On TensorFlow this is one 2-D `MatMul(transpose_b=True)`, which XLA, oneDNN and the TFLite
    converter (FULLY_CONNECTED, whose weights are [out, in]) all take as it is; on JAX the
    transpose folds into the dot.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        flat = tf.reshape(x, [-1, x.shape[-1]])
        y = tf.matmul(flat, w, transpose_b=True)
        return tf.reshape(y, tf.concat([tf.shape(x)[:-1], tf.shape(w)[:1]], axis=0))
    return ops.matmul(x, ops.transpose(w))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Linear(keras.layers.Layer):
    """A bias-free projection `x @ kernel.T`, `kernel` [out, in] as in torch and the checkpoints.

    Keras' `Dense` stores [in, out]; [out, in] reads each output's weights contiguously, which
    XLA's CPU matrix-vector product (one decode step) runs about 1.4x faster, and which TFLite's
    FULLY_CONNECTED stores as it is.

    `enable_lora(rank, alpha)` adds PEFT's adapters `lora_a` [rank, in] (random) and `lora_b`
    [out, rank] (zeros); the layer then returns `x @ kernel.T + alpha / rank * (x @ lora_a.T)
    @ lora_b.T`, never forming the full-size update. `merge_lora()` folds them in.
    """

    def __init__(self, units, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(self.units, input_shape[-1]),
                                      initializer=self.kernel_initializer)
        self.built = True

    def call(self, x):
        y = matmul_transposed(x, ops.cast(self.kernel, x.dtype))
        if self.lora_enabled:
            a = ops.cast(self.lora_a, x.dtype)
            b = ops.cast(self.lora_b, x.dtype)
            scale = self.lora_alpha / self.lora_rank
            y = y + matmul_transposed(matmul_transposed(x, a), b) * scale
        return y

    def enable_lora(self, rank, lora_alpha=None):
        """Add rank-`rank` adapters (float32, scaled by `lora_alpha / rank`)."""
        if not self.built:
            raise ValueError(f"{self.name}: build the layer before enabling LoRA")
        if self.lora_enabled:
            raise ValueError(f"{self.name}: LoRA is already enabled")
        self._tracker.unlock()
        out_dim, in_dim = self.kernel.shape
        self.lora_a = self.add_weight(name="lora_a", shape=(rank, in_dim), dtype="float32",
                                      initializer="he_uniform")
        self.lora_b = self.add_weight(name="lora_b", shape=(out_dim, rank), dtype="float32",
                                      initializer="zeros")
        self._tracker.lock()
        self.lora_enabled, self.lora_rank = True, rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank

    def merged_kernel(self):
        """The kernel with the adapters folded in (`kernel + alpha / rank * lora_b @ lora_a`),
        as a float32 NumPy array [out, in]; the plain kernel without adapters."""
        kernel = ops.convert_to_numpy(self.kernel).astype("float32")
        if not self.lora_enabled:
            return kernel
        a = ops.convert_to_numpy(self.lora_a).astype("float32")
        b = ops.convert_to_numpy(self.lora_b).astype("float32")
        return kernel + (self.lora_alpha / self.lora_rank) * (b @ a)

    def merge_lora(self):
        """Fold the adapters into `kernel` (in float32) and remove them."""
        if not self.lora_enabled:
            raise ValueError(f"{self.name}: LoRA is not enabled")
        self.kernel.assign(self.merged_kernel().astype(self.kernel.dtype))
        for name in ("lora_a", "lora_b"):
            # what `del self.<name>` does, without its gc.collect() per variable (0.4 s each)
            self._untrack_variable(getattr(self, name))
            object.__delattr__(self, name)
        self.lora_enabled, self.lora_rank, self.lora_alpha = False, None, None

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RMSNorm(keras.layers.Layer):
    """Gemma's RMSNorm: computed in float32 and scaled by `(1 + weight)`, weight starting at 0."""

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="zeros"
        )
        self.built = True

    def call(self, x):
        x32 = ops.cast(x, "float32")
        variance = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        normed = x32 * ops.rsqrt(variance + self.epsilon)
        return ops.cast(normed * (1.0 + ops.cast(self.scale, "float32")), x.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TiedEmbedding(keras.layers.Embedding):
    """Token embedding whose matrix also serves as the output head (`attend`)."""

    def attend(self, x):
        """Project hidden states [..., hidden] onto the vocabulary: `x @ embeddings.T`."""
        return matmul_transposed(x, ops.cast(self.embeddings, x.dtype))
