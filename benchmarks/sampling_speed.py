"""Milliseconds per next-token draw over Gemma's 256,000-token vocabulary: the sampling
definition read literally (rank the whole row, noise for every id) against what
`gemma_keras.samplers.sample` and the SavedModel's TensorFlow twin do (rank only the
candidates that provably hold the kept tokens, noise for the kept ids only). Both give the
same ids (tests/test_sampling.py); this prints their cost.

    .venv/bin/python benchmarks/sampling_speed.py [--repeats 7]

Logits are standard normal times sigma, one row: sigma 1 is flat (top-p 0.9 keeps most of
the vocabulary, the shortcut hands the row to the full ranking), larger sigmas are peaked as
a language model's next-token distribution usually is.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import machine

VOCAB = 256_000
# (sigma, temperature, top_k, top_p)
CASES = [(1.0, 1.0, 0, 0.9), (3.0, 1.0, 0, 0.9), (3.0, 1.0, 0, 0.99), (6.0, 1.0, 0, 0.9),
         (6.0, 0.7, 0, 0.95), (6.0, 1.0, 50, 1.0), (6.0, 1.0, 40, 0.9), (6.0, 1.0, 0, 1.0)]


def _ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from gemma_keras import samplers
    from gemma_keras.serving import sampling

    def numpy_literal(logits, seeds, temperature, top_k, top_p):
        x = logits.astype(np.float64) / np.float64(np.float32(temperature))
        k = top_k or x.shape[1]
        kept = (np.ones(x.shape, bool) if k == x.shape[1] and top_p >= 1
                else samplers.kept_tokens_by_sort(x, k, np.float64(np.float32(top_p))))
        return np.argmax(np.where(kept, x + samplers.gumbel(seeds, 3, x.shape[1]), -np.inf), -1)

    @tf.function
    def tf_literal(logits, temperature, top_k, top_p, seeds):
        x = tf.cast(logits, tf.float64) / tf.cast(temperature, tf.float64)[:, None]
        vocab = tf.shape(x)[1]
        k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
        kept = sampling.kept_tokens(x, k, tf.cast(top_p, tf.float64))
        return sampling.gumbel_max(x, kept, tf.range(vocab)[None], seeds, 3, vocab)

    tf_shortcut = tf.function(lambda *a: sampling.next_token(*a, tf.constant(3)))

    print(f"# {machine.describe()}; vocabulary {VOCAB}, one row, median of {args.repeats}")
    print("| logits sigma | temperature | top_k | top_p | kept tokens | NumPy literal ms | "
          "NumPy `sample` ms | speedup | TF literal ms | TF `next_token` ms | speedup |")
    print("|---" * 11 + "|")
    rng = np.random.default_rng(0)
    seeds = samplers.row_seeds(1, 1)
    for sigma, temperature, top_k, top_p in CASES:
        logits = (rng.standard_normal((1, VOCAB)) * sigma).astype(np.float32)
        x = logits.astype(np.float64) / np.float64(np.float32(temperature))
        kept = samplers.kept_tokens(x, top_k, np.float64(np.float32(top_p))).sum()
        tensors = (tf.constant(logits), tf.constant([temperature], tf.float32),
                   tf.constant([top_k], tf.int32), tf.constant([top_p], tf.float32),
                   tf.constant(seeds))
        ids = {numpy_literal(logits, seeds, temperature, top_k, top_p)[0],
               samplers.sample(logits, seeds, 3, temperature, top_k, top_p)[0],
               int(tf_literal(*tensors)[0]), int(tf_shortcut(*tensors)[0])}
        if len(ids) != 1:
            raise SystemExit(f"the four draws differ: {ids}")
        times = [_ms(lambda: numpy_literal(logits, seeds, temperature, top_k, top_p),
                     args.repeats),
                 _ms(lambda: samplers.sample(logits, seeds, 3, temperature, top_k, top_p),
                     args.repeats),
                 _ms(lambda: tf_literal(*tensors).numpy(), args.repeats),
                 _ms(lambda: tf_shortcut(*tensors).numpy(), args.repeats)]
        print(f"| {sigma:g} | {temperature:g} | {top_k} | {top_p:g} | {kept} | {times[0]:.1f} | "
              f"{times[1]:.1f} | {times[0] / times[1]:.1f}x | {times[2]:.1f} | {times[3]:.1f} | "
              f"{times[2] / times[3]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
