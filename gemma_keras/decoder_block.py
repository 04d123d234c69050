"""One Gemma 2 transformer block: attention and a GeGLU MLP, each wrapped in two RMSNorms."""

from __future__ import annotations

import keras
from keras import ops

from gemma_keras.attention import Gemma2Attention
from gemma_keras.layers import _PACKAGE, Linear, RMSNorm
from gemma_keras.remat import recompute_after_gradient


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Gemma2DecoderBlock(keras.layers.Layer):
    """`x + post_attn_norm(attn(input_norm(x)))`, then `x + post_ffw_norm(mlp(pre_ffw_norm(x)))`.

    The MLP is GeGLU: `down(gelu_tanh(gate(x)) * up(x))`.
    """

    def __init__(self, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim,
                 query_pre_attn_scalar, logit_soft_cap=None, rope_theta=10000.0,
                 rms_norm_eps=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.logit_soft_cap = logit_soft_cap
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps

        policy = self.dtype_policy

        def norm(name):
            return RMSNorm(rms_norm_eps, name=name, dtype=policy)

        def dense(units, name):
            return Linear(units, name=name, dtype=policy)

        self.input_layernorm = norm("input_layernorm")
        self.self_attn = Gemma2Attention(
            num_heads, num_kv_heads, head_dim, query_pre_attn_scalar, logit_soft_cap,
            rope_theta, name="self_attn", dtype=policy,
        )
        self.post_attention_layernorm = norm("post_attention_layernorm")
        self.pre_feedforward_layernorm = norm("pre_feedforward_layernorm")
        self.gate_proj = dense(intermediate_size, "gate_proj")
        self.up_proj = dense(intermediate_size, "up_proj")
        self.down_proj = dense(hidden_size, "down_proj")
        self.post_feedforward_layernorm = norm("post_feedforward_layernorm")

    def build(self, input_shape=None):
        hidden_shape = (None, None, self.hidden_size)
        for layer in (self.input_layernorm, self.self_attn, self.post_attention_layernorm,
                      self.pre_feedforward_layernorm, self.gate_proj, self.up_proj,
                      self.post_feedforward_layernorm):
            layer.build(hidden_shape)
        self.down_proj.build((None, None, self.intermediate_size))
        self.built = True

    def call(self, x, positions, mask, cache=None, cache_index=None):
        attn, cache = self.self_attn(
            self.input_layernorm(x), positions, mask, cache=cache, cache_index=cache_index
        )
        x = x + self.post_attention_layernorm(attn)

        h = self.pre_feedforward_layernorm(x)
        h = self.down_proj(ops.gelu(self.gate_proj(h), approximate=True) * self.up_proj(h))
        x = x + self.post_feedforward_layernorm(h)
        return x, cache

    def rematerialized_call(self, layer_call, *args, **kwargs):
        """Keras' remat hook, made to work: each block saves only its input and is recomputed
        in the backward pass once the gradient reaching it exists. On TensorFlow with
        `tf.recompute_grad` (which takes no keyword arguments, so the block is a function of
        `x` alone, positions and mask closed over); on JAX with `recomputed_after_gradient`,
        because `jax.checkpoint` barely saves memory on XLA's CPU backend (see
        benchmarks/jax_remat.py). Generation (with a cache) is never rematerialised."""
        backend = keras.backend.backend()
        remat = backend in ("tensorflow", "jax") and self._remat_mode is not None and (
            self._remat_mode.mode == "list_of_layers"
            and self.name in self._remat_mode.layer_names)
        if not remat:
            return super().rematerialized_call(layer_call, *args, **kwargs)

        def call(x, positions, mask, cache=None, cache_index=None):
            if cache is not None:
                return layer_call(x, positions, mask, cache=cache, cache_index=cache_index)
            block = lambda h: layer_call(h, positions, mask)[0]  # noqa: E731
            if backend == "jax":
                return recomputed_after_gradient(block, self, x), None
            import tensorflow as tf

            return tf.recompute_grad(block)(x), None

        return call

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "logit_soft_cap": self.logit_soft_cap,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
        }


def recomputed_after_gradient(fn, layer, x):
    """`fn(x)` on JAX through `remat.recompute_after_gradient`, differentiable in `x` and in
    `layer`'s trainable variables, which are passed explicitly. `layer`'s other variables
    (frozen weights) are mapped to the step's own values (a nested `StatelessScope` does not
    inherit the outer one's) and get no gradient."""
    trainable = list(layer.trainable_variables)
    frozen = [(v, v.value) for v in layer.non_trainable_variables]

    def with_values(values, h):
        with keras.StatelessScope(state_mapping=list(zip(trainable, values)) + frozen):
            return fn(h)

    return recompute_after_gradient(with_values, [v.value for v in trainable], x)
