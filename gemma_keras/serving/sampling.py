"""In-graph choice of the next token: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import tensorflow as tf


def _gumbel_noise(seeds, step, vocab_size):
    """Gumbel(0, 1) noise [batch, vocab]; row b depends only on (seeds[b], step), so a
    request's samples do not change with the other prompts in its batch."""

    def row(seed):
        u = tf.random.stateless_uniform(
            [vocab_size], seed=tf.stack([seed, tf.cast(step, tf.int64)]),
            minval=1e-20, maxval=1.0,
        )
        return -tf.math.log(-tf.math.log(u))

    return tf.map_fn(row, seeds, fn_output_signature=tf.float32)


def _sample(logits, temperature, top_k, top_p, seeds, step):
    vocab_size = tf.shape(logits)[1]
    scaled = logits / tf.where(temperature > 0, temperature, 1.0)[:, None]
    ranked = tf.sort(scaled, axis=-1, direction="DESCENDING")
    # top-k: keep logits >= the k-th largest (k = 0 means no limit).
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab_size), vocab_size)
    kth = tf.gather(ranked, k - 1, batch_dims=1)
    # top-p: keep the smallest prefix of ranked tokens whose probability reaches top_p.
    mass_before = tf.cumsum(tf.nn.softmax(ranked), axis=-1, exclusive=True)
    n_p = tf.maximum(tf.reduce_sum(tf.cast(mass_before < top_p[:, None], tf.int32), -1), 1)
    pth = tf.gather(ranked, n_p - 1, batch_dims=1)
    threshold = tf.maximum(kth, pth)[:, None]
    kept = tf.where(scaled >= threshold, scaled, tf.constant(-float("inf"), scaled.dtype))
    return tf.argmax(kept + _gumbel_noise(seeds, step, vocab_size), -1, output_type=tf.int32)


def next_token(logits, temperature, top_k, top_p, seeds, step):
    """Next token ids [batch] from float32 `logits` [batch, vocab].

    Per-row parameters ([batch] each): `temperature` (0 means greedy: argmax), `top_k`
    (0 means off), `top_p` (1 means off), `seeds` (int64). Sampling draws with the Gumbel-max
    trick from the temperature-scaled logits restricted by top-k and top-p.
    """
    greedy = tf.argmax(logits, -1, output_type=tf.int32)
    sampling = temperature > 0
    return tf.cond(
        tf.reduce_any(sampling),
        lambda: tf.where(sampling, _sample(logits, temperature, top_k, top_p, seeds, step),
                         greedy),
        lambda: greedy,
    )
