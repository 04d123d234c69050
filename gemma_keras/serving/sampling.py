"""In-graph choice of the next token: the TensorFlow twin of `gemma_keras.samplers`.

It follows that module's definition step by step (greedy at temperature 0; float64
`x = logits / temperature`; top-k, then top-p over the tokens top-k kept; Gumbel-max with the
counter-based random stream `u(seed, step, id)`), with the same int64 integer hash and the
same float64 arithmetic, so a seed gives the tokens the Keras model and the TFLite runtime
give. Here the settings are per row: [batch] tensors.
"""

from __future__ import annotations

import tensorflow as tf

from gemma_keras.samplers import MASK32, MIX_MULTIPLIER


def mix32(x):
    """`samplers.mix32` in TensorFlow ops (int64 values in [0, 2**32))."""
    for _ in range(2):
        x = tf.bitwise.bitwise_and(
            (tf.bitwise.bitwise_xor(tf.bitwise.right_shift(x, 16), x)) * MIX_MULTIPLIER, MASK32)
    return tf.bitwise.bitwise_xor(tf.bitwise.right_shift(x, 16), x)


def uniform(seeds, step, vocab_size):
    """`samplers.uniform`: float64 [batch, vocab] in (0, 1) for int64 `seeds` [batch]."""
    seeds = tf.cast(seeds, tf.int64)
    low = tf.bitwise.bitwise_and(seeds, MASK32)
    high = tf.bitwise.bitwise_and(tf.bitwise.right_shift(seeds, 32), MASK32)
    key = mix32(tf.bitwise.bitwise_xor(mix32(low), high))
    key = mix32(tf.bitwise.bitwise_xor(key, tf.bitwise.bitwise_and(tf.cast(step, tf.int64),
                                                                   MASK32)))
    ids = mix32(tf.range(tf.cast(vocab_size, tf.int64), dtype=tf.int64))
    bits = mix32(tf.bitwise.bitwise_xor(ids[None, :], key[:, None]))
    return (tf.cast(bits, tf.float64) + 0.5) / 2.0**32


def kept_tokens(x, top_k, top_p):
    """`samplers.kept_tokens` with per-row `top_k` (int32, 0: off) and `top_p` (float64,
    1: off): bool [batch, vocab]."""
    vocab_size = tf.shape(x)[1]
    order = tf.argsort(x, axis=-1, direction="DESCENDING", stable=True)  # ties: lower id
    ranked = tf.gather(x, order, batch_dims=1)
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab_size), vocab_size)
    in_k = tf.range(vocab_size)[None, :] < k[:, None]
    weights = tf.where(in_k, tf.exp(ranked - ranked[:, :1]), tf.constant(0.0, tf.float64))
    cumulative = tf.cumsum(weights, axis=-1)
    before = tf.concat([tf.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=-1)
    in_p = (before < top_p[:, None] * cumulative[:, -1:]) | (top_p >= 1.0)[:, None]
    keep = in_k & in_p  # by rank
    rank_of_id = tf.argsort(order, axis=-1)
    return tf.gather(keep, rank_of_id, batch_dims=1)


def _sample(logits, temperature, top_k, top_p, seeds, step):
    x = tf.cast(logits, tf.float64) / tf.cast(tf.where(temperature > 0, temperature, 1.0),
                                              tf.float64)[:, None]
    kept = kept_tokens(x, top_k, tf.cast(top_p, tf.float64))
    noise = -tf.math.log(-tf.math.log(uniform(seeds, step, tf.shape(x)[1])))
    scores = tf.where(kept, x + noise, tf.constant(-float("inf"), tf.float64))
    return tf.argmax(scores, -1, output_type=tf.int32)


def next_token(logits, temperature, top_k, top_p, seeds, step):
    """Next token ids [batch] from float32 `logits` [batch, vocab].

    Per-row settings ([batch] each): `temperature` (float32; 0 means greedy: argmax),
    `top_k` (int32; 0 means off), `top_p` (float32; 1 means off), `seeds` (int64); `step` is
    the index of the new token (0 for the first).
    """
    greedy = tf.argmax(logits, -1, output_type=tf.int32)
    sampling = temperature > 0
    return tf.cond(
        tf.reduce_any(sampling),
        lambda: tf.where(sampling, _sample(logits, temperature, top_k, top_p, seeds, step),
                         greedy),
        lambda: greedy,
    )
