"""Gemma 2 attention: grouped-query, RoPE, logit soft-cap, optional KV cache."""

from __future__ import annotations

import keras
from keras import ops

from gemma_keras.layers import _PACKAGE, Linear, apply_rope, soft_cap

_MASKED = -1e30  # added where attention is masked out (logits are float32 here)


def attention_masks(query_positions, key_positions, key_valid, sliding_window):
    """Boolean masks [batch, query, key] for global and sliding-window layers.

    A key is visible to a query when it is valid (not padding, already written), not in the
    future, and, for sliding layers, fewer than `sliding_window` positions behind.
    """
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    full = ops.logical_and(k <= q, ops.cast(key_valid, "bool")[:, None, :])
    sliding = ops.logical_and(full, (q - k) < sliding_window)
    return full, sliding


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Gemma2Attention(keras.layers.Layer):
    """Multi-head attention with grouped keys/values, as in transformers' `Gemma2Attention`.

    `call(x, positions, mask, cache=None, cache_index=None)`:
      x         [batch, seq, hidden]
      positions [batch, seq] int, the RoPE positions of `x`
      mask      [batch, seq, keys] bool; keys are `x` itself, or the cache slots when cached
      cache     (k [batch, kv_heads, slots, head_dim], v [batch, kv_heads, head_dim, slots]);
                the new keys and values are written at slot `cache_index` and the updated
                cache is returned.
    Returns `(output, cache)`; `cache` is None when none was given.
    """

    def __init__(self, num_heads, num_kv_heads, head_dim, query_pre_attn_scalar,
                 logit_soft_cap=None, rope_theta=10000.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.logit_soft_cap = logit_soft_cap
        self.rope_theta = rope_theta

        def dense(units, name):
            return Linear(units, name=name, dtype=self.dtype_policy)

        self.q_proj = dense(num_heads * head_dim, "q_proj")
        self.k_proj = dense(num_kv_heads * head_dim, "k_proj")
        self.v_proj = dense(num_kv_heads * head_dim, "v_proj")
        self.o_proj = None  # built with the hidden size

    def build(self, input_shape):
        hidden = input_shape[-1]
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.build(input_shape)
        self.o_proj = Linear(hidden, name="o_proj", dtype=self.dtype_policy)
        self.o_proj.build((None, None, self.num_heads * self.head_dim))
        self.built = True

    def call(self, x, positions, mask, cache=None, cache_index=None):
        batch, seq = ops.shape(x)[0], ops.shape(x)[1]
        groups = self.num_heads // self.num_kv_heads

        q = ops.reshape(self.q_proj(x), (batch, seq, self.num_heads, self.head_dim))
        k = ops.reshape(self.k_proj(x), (batch, seq, self.num_kv_heads, self.head_dim))
        v = ops.reshape(self.v_proj(x), (batch, seq, self.num_kv_heads, self.head_dim))
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)

        # The cache layout: keys [b, kv_heads, slots, head_dim], values transposed,
        # [b, kv_heads, head_dim, slots]. Both products below then read the cache as their
        # left operand, as it is stored, and only the few query rows are repacked (a TFLite
        # BATCH_MATMUL on XNNPACK repacks its right operand on every call).
        k = ops.transpose(k, (0, 2, 1, 3))
        v = ops.transpose(v, (0, 2, 3, 1))
        if cache is not None:
            k_cache, v_cache = cache
            k = ops.slice_update(k_cache, [0, 0, cache_index, 0], ops.cast(k, k_cache.dtype))
            v = ops.slice_update(v_cache, [0, 0, 0, cache_index], ops.cast(v, v_cache.dtype))
            cache = (k, v)
            k, v = ops.cast(k, q.dtype), ops.cast(v, q.dtype)

        # The queries sharing a key/value head are rows of one matrix: [b, kv_heads, groups*t, d].
        q = ops.reshape(q, (batch, seq, self.num_kv_heads, groups, self.head_dim))
        q = ops.reshape(ops.transpose(q, (0, 2, 3, 1, 4)),
                        (batch, self.num_kv_heads, groups * seq, self.head_dim))
        logits = ops.transpose(ops.einsum("bksd,bkqd->bksq", k, q), (0, 1, 3, 2))
        logits = ops.cast(logits, "float32") * (float(self.query_pre_attn_scalar) ** -0.5)
        logits = soft_cap(logits, self.logit_soft_cap)
        logits = ops.reshape(logits, (batch, self.num_kv_heads, groups, seq, -1))
        logits = ops.where(mask[:, None, None, :, :], logits, _MASKED)
        probs = ops.cast(ops.softmax(logits, axis=-1), v.dtype)

        probs = ops.reshape(probs, (batch, self.num_kv_heads, groups * seq, -1))
        out = ops.einsum("bkds,bkqs->bkdq", v, probs)  # [b, kv_heads, d, groups*t]
        out = ops.reshape(out, (batch, self.num_kv_heads, self.head_dim, groups, seq))
        out = ops.reshape(ops.transpose(out, (0, 4, 1, 3, 2)),
                          (batch, seq, self.num_heads * self.head_dim))
        return self.o_proj(out), cache

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "logit_soft_cap": self.logit_soft_cap,
            "rope_theta": self.rope_theta,
        }
