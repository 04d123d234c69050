"""The one sampling definition (`gemma_keras.samplers`) and its TensorFlow twin
(`gemma_keras.serving.sampling`): the same random stream bit for bit, the same token ids."""

import numpy as np
import pytest

from gemma_keras import samplers


def test_random_stream_is_uniform_and_counter_based():
    seeds = samplers.row_seeds(123, 4)
    u = samplers.uniform(seeds, 5, 50_000)
    assert u.min() > 0 and u.max() < 1
    counts = np.histogram(u, bins=10, range=(0, 1))[0] / u.size
    np.testing.assert_allclose(counts, 0.1, atol=0.003)
    # neighbouring ids, steps and seeds are not correlated
    assert abs(np.corrcoef(u[0, :-1], u[0, 1:])[0, 1]) < 0.02
    assert abs(np.corrcoef(u[0], samplers.uniform(seeds, 6, 50_000)[0])[0, 1]) < 0.02
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.02
    # a row's numbers depend only on its seed, the step and the id
    np.testing.assert_array_equal(samplers.uniform(seeds[2:3], 5, 100), u[2:3, :100])


def test_row_seeds():
    np.testing.assert_array_equal(samplers.row_seeds(7, 3), [7, 8, 9])
    np.testing.assert_array_equal(samplers.row_seeds([4, -1], 2), [4, -1])
    assert samplers.row_seeds(2**63 - 1, 2)[1] == -2**63  # int64, wrapped as TensorFlow's
    fresh = samplers.row_seeds(None, 2)
    assert fresh[1] == fresh[0] + 1 and fresh[0] != samplers.row_seeds(None, 2)[0]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        samplers.row_seeds([1, 2], 3)


def test_ties_go_to_the_lowest_id():
    logits = np.array([[0.0, 3.0, 1.0, 3.0, 3.0]], "float32")
    seeds = samplers.row_seeds(0, 1)
    assert samplers.sample(logits, seeds, 0) == [1]  # greedy
    for step in range(20):  # top-k 1 keeps only the lowest of the three tied ids
        assert samplers.sample(logits, seeds, step, temperature=1.0, top_k=1) == [1]
    kept = samplers.kept_tokens(logits.astype("float64"), top_k=2)
    np.testing.assert_array_equal(kept, [[False, True, False, True, False]])


SETTINGS = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 0, 1.0), (2.5, 5, 1.0), (1.0, 1, 1.0),
            (1.0, 0, 0.9), (0.5, 0, 0.3), (1.3, 20, 0.8), (1.0, 3, 0.5), (0.8, 400, 0.95)]


def test_numpy_and_tensorflow_draw_the_same_tokens():
    """Many random logits (well separated: standard normal times up to 8, so no two are
    within rounding of each other), settings and seeds; vocabularies up to Gemma's."""
    import tensorflow as tf

    from gemma_keras.serving.sampling import next_token, uniform

    seeds = np.array([0, -1, 2**62 + 5, 12345, -2**63], np.int64)
    for step in (0, 7, 2**31 + 3):
        np.testing.assert_array_equal(uniform(tf.constant(seeds), tf.constant(step), 1000),
                                      samplers.uniform(seeds, step, 1000))
    rng = np.random.default_rng(0)
    compared = 0
    for trial in range(40):
        vocab = 256_000 if trial == 0 else int(rng.integers(2, 600))
        batch = 2 if trial == 0 else 4
        logits = (rng.standard_normal((batch, vocab)) * rng.uniform(0.5, 8)).astype("float32")
        temperature, top_k, top_p = SETTINGS[trial % len(SETTINGS)]
        row_seeds = samplers.row_seeds(int(rng.integers(-2**40, 2**40)), batch)
        step = int(rng.integers(0, 1000))
        ours = samplers.sample(logits, row_seeds, step, temperature, top_k, top_p)
        theirs = next_token(
            tf.constant(logits), tf.fill([batch], np.float32(temperature)),
            tf.fill([batch], top_k), tf.fill([batch], np.float32(top_p)),
            tf.constant(row_seeds), tf.constant(step)).numpy()
        np.testing.assert_array_equal(ours, theirs, err_msg=f"trial {trial}")
        compared += batch
    assert compared == 2 + 39 * 4


def test_per_row_settings_in_tensorflow_are_each_rows_own():
    """The SavedModel's batch may mix settings: each row draws as it would alone."""
    import tensorflow as tf

    from gemma_keras.serving.sampling import next_token

    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((len(SETTINGS), 300)) * 4).astype("float32")
    temperature, top_k, top_p = (np.array(v) for v in zip(*SETTINGS))
    seeds = samplers.row_seeds(99, len(SETTINGS))
    mixed = next_token(tf.constant(logits), tf.constant(temperature, tf.float32),
                       tf.constant(top_k, tf.int32), tf.constant(top_p, tf.float32),
                       tf.constant(seeds), tf.constant(3)).numpy()
    alone = [samplers.sample(logits[b:b + 1], seeds[b:b + 1], 3, *SETTINGS[b])[0]
             for b in range(len(SETTINGS))]
    np.testing.assert_array_equal(mixed, alone)
