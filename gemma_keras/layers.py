"""The building blocks of Gemma 2: RMSNorm, rotary embedding, tied embedding, soft-cap."""

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
        return ops.matmul(x, ops.transpose(ops.cast(self.embeddings, x.dtype)))
