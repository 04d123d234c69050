"""In-graph choice of the next token: the TensorFlow twin of `gemma_keras.samplers`.

It follows that module's definition step by step (greedy at temperature 0; float64
`x = logits / temperature`; top-k, then top-p over the tokens top-k kept; Gumbel-max with the
counter-based random stream `u(seed, step, id)`), with the same int64 integer hash and the
same float64 arithmetic, so a seed gives the tokens the Keras model and the TFLite runtime
give. Here the settings are per row: [batch] tensors.
"""

from __future__ import annotations

import numpy as np
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
    return uniform_at(seeds, step, tf.range(tf.cast(vocab_size, tf.int64), dtype=tf.int64)[None])


def uniform_at(seeds, step, ids):
    """`samplers.uniform_at`: `u(seeds[b], step, ids[b, i])`, float64 [batch, n] for int64
    `seeds` [batch] and `ids` [batch or 1, n]."""
    seeds = tf.cast(seeds, tf.int64)
    low = tf.bitwise.bitwise_and(seeds, MASK32)
    high = tf.bitwise.bitwise_and(tf.bitwise.right_shift(seeds, 32), MASK32)
    key = mix32(tf.bitwise.bitwise_xor(mix32(low), high))
    key = mix32(tf.bitwise.bitwise_xor(key, tf.bitwise.bitwise_and(tf.cast(step, tf.int64),
                                                                   MASK32)))
    bits = mix32(tf.bitwise.bitwise_xor(mix32(tf.cast(ids, tf.int64)), key[:, None]))
    return (tf.cast(bits, tf.float64) + 0.5) / 2.0**32


def gumbel_max(scores, kept, ids, seeds, step, vocab_size):
    """The id (int32 [batch]) with the highest `scores + g(seed, step, id)` among the `kept`
    ones, ties to the lowest id; `scores`, `kept`, `ids` [batch, n] (ids [1, n]: every row's)."""
    noise = -tf.math.log(-tf.math.log(uniform_at(seeds, step, ids)))
    scores = tf.where(kept, scores + noise, tf.constant(-float("inf"), tf.float64))
    best = tf.reduce_max(scores, -1, keepdims=True)
    ids = tf.broadcast_to(tf.cast(ids, tf.int32), tf.shape(scores))
    return tf.reduce_min(tf.where(scores == best, ids, vocab_size), -1)


def kept_tokens(x, k, top_p):
    """`samplers.kept_tokens_by_sort` with per-row `k` (int32, in [1, vocab]) and `top_p`
    (float64, 1: off): bool [batch, vocab], ranking the whole row."""
    vocab_size = tf.shape(x)[1]
    order = tf.argsort(x, axis=-1, direction="DESCENDING", stable=True)  # ties: lower id
    ranked = tf.gather(x, order, batch_dims=1)
    in_k = tf.range(vocab_size)[None, :] < k[:, None]
    weights = tf.where(in_k, tf.exp(ranked - ranked[:, :1]), tf.constant(0.0, tf.float64))
    cumulative = tf.cumsum(weights, axis=-1)
    before = tf.concat([tf.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=-1)
    in_p = (before < top_p[:, None] * cumulative[:, -1:]) | (top_p >= 1.0)[:, None]
    keep = in_k & in_p  # by rank
    rows = tf.broadcast_to(tf.range(tf.shape(x)[0])[:, None], tf.shape(order))
    by_id = tf.scatter_nd(tf.stack([rows, order], -1), tf.cast(keep, tf.int32), tf.shape(x))
    return by_id > 0


# Top-k and top-p first rank only this many candidates, then this many, as
# `samplers.top_p_ids` does; a batch with a row they do not decide is ranked in full.
CANDIDATES = (1024, 16384)


def candidates_keep(x, values, k, top_p):
    """For the m highest scores `values` [batch, m] of `x` (ranked, ties to the lower id):
    which ranks top-k and top-p keep (bool [batch, m]) and whether that decides the row
    (bool [batch]: no token outside them is kept).

    A row with `k` <= m has its definition's total among the candidates, exactly; a row
    without top-k (`k` = vocab) bounds the total, summed in another order, within `margin`
    and decides as `samplers.top_p_ids` does. Other rows (m < k < vocab, or nothing to
    leave out) are not decided.
    """
    vocab_size, m = tf.shape(x)[1], tf.shape(values)[1]
    cumulative = tf.cumsum(tf.exp(values - values[:, :1]), axis=-1)
    before = tf.concat([tf.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=-1)
    small_k = k <= m
    total = tf.where(small_k, tf.gather(cumulative, tf.minimum(k, m) - 1, batch_dims=1),
                     tf.reduce_sum(tf.exp(x - values[:, :1]), -1))
    margin = tf.where(small_k, tf.constant(0.0, tf.float64),
                      4.0 * tf.cast(vocab_size, tf.float64) * np.finfo(np.float64).eps)
    low = (top_p * total * (1 - margin))[:, None]
    high = (top_p * total * (1 + margin))[:, None]
    off = (top_p >= 1.0)[:, None]
    keep = (tf.range(m)[None, :] < k[:, None]) & ((before < low) | off)
    undecided = tf.reduce_any((before >= low) & (before < high), -1)
    reaches = (cumulative[:, -1:] >= high)[:, 0] & (top_p < 1.0)
    decided = small_k | ((k == vocab_size) & reaches & tf.logical_not(undecided))
    return keep, decided


def _sample(logits, temperature, top_k, top_p, seeds, step, sampling):
    x = tf.cast(logits, tf.float64) / tf.cast(tf.where(temperature > 0, temperature, 1.0),
                                              tf.float64)[:, None]
    top_p = tf.cast(top_p, tf.float64)
    vocab_size = tf.shape(x)[1]
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab_size), vocab_size)

    def whole_row():
        keeps_all = tf.reduce_all((k == vocab_size) & (top_p >= 1.0))
        kept = tf.cond(keeps_all, lambda: tf.ones(tf.shape(x), tf.bool),
                       lambda: kept_tokens(x, k, top_p))
        return gumbel_max(x, kept, tf.range(vocab_size)[None], seeds, step, vocab_size)

    def among(m, otherwise):
        values, order = tf.math.top_k(x, tf.minimum(m, vocab_size))  # ties: lower id
        keep, decided = candidates_keep(x, values, k, top_p)
        return tf.cond(tf.reduce_all(decided | tf.logical_not(sampling)),
                       lambda: gumbel_max(values, keep, order, seeds, step, vocab_size),
                       otherwise)

    return among(CANDIDATES[0], lambda: among(CANDIDATES[1], whole_row))


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
        lambda: tf.where(sampling, _sample(logits, temperature, top_k, top_p, seeds, step,
                                           sampling), greedy),
        lambda: greedy,
    )
