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


def _shortcut_rows(rng, vocab, rows):
    """Rows of float64 scores for the top-p shortcut: peaked and flat, with many exact ties
    (scores on a grid of 0.5), with one top score or several tied at the top, and all equal."""
    out = []
    for r in range(rows):
        x = rng.standard_normal(vocab) * rng.choice([0.5, 2.0, 5.0, 12.0])
        if r % 3 == 1:
            x = np.round(x * 2) / 2  # ties everywhere, at the boundary too
        if r % 5 == 2:
            x[rng.choice(vocab, 7, replace=False)] = x.max() + 3.0  # seven tied at the top
        out.append(x if r % 17 != 5 else np.zeros(vocab))
    return np.stack(out)


# p read as float32, from tiny to the largest float32 below 1; top_k off, below and above
# the candidate counts.
SHORTCUT_P = [1e-6, 0.1, 0.5, 0.9, 0.95, 0.999, float(np.float32(1 - 2**-24))]
SHORTCUT_K = [0, 0, 0, 2500, 6000]


def test_top_p_shortcut_keeps_the_tokens_of_the_full_ranking():
    """`samplers.kept_tokens` ranks a few candidates, `kept_tokens_by_sort` the whole row:
    the same tokens on every row, both branches taken (decided from the candidates, and
    handed to the full ranking: flat rows, p near 1, a total on the threshold)."""
    rng = np.random.default_rng(3)
    x = _shortcut_rows(rng, 12_000, 140)
    decided = 0
    for r, row in enumerate(x):
        top_p = np.float64(np.float32(SHORTCUT_P[r % len(SHORTCUT_P)]))
        top_k = SHORTCUT_K[r % len(SHORTCUT_K)]
        k = top_k or row.size
        expected = samplers.kept_tokens_by_sort(row[None], k, top_p)
        np.testing.assert_array_equal(samplers.kept_tokens(row[None], top_k, top_p), expected,
                                      err_msg=f"row {r}")
        decided += samplers.top_p_ids(row, k, top_p) is not None
    assert 60 <= decided <= 130, decided
    # Exactly on the threshold: 4096 equal scores, p = 0.5: rank 2048 has half of the mass
    # before it and is dropped; the shortcut cannot tell within its margin and defers.
    flat = np.zeros((1, 4096))
    assert samplers.top_p_ids(flat[0], 4096, 0.5) is None
    assert samplers.kept_tokens(flat, 0, 0.5).sum() == 2048
    # At Gemma's vocabulary: a peaked row and a flatter one, p = 0.9 and near 1.
    gemma = rng.standard_normal((2, 256_000)) * np.array([[6.0], [2.0]])
    for top_p in (0.9, np.float64(np.float32(1 - 2**-24))):
        np.testing.assert_array_equal(samplers.kept_tokens(gemma, 0, top_p),
                                      samplers.kept_tokens_by_sort(gemma, 256_000, top_p))


def test_top_p_shortcut_draws_the_ids_of_the_full_ranking_in_numpy_and_tensorflow():
    """The ids `sample` and the TensorFlow twin draw (each with its shortcut) equal the ids
    of the definition read literally (rank all, noise for all), and the twin's candidates
    keep, on the rows they decide, what its own full ranking keeps."""
    import tensorflow as tf

    from gemma_keras.serving import sampling

    rng = np.random.default_rng(4)
    logits = _shortcut_rows(rng, 40_000, 32).astype("float32")
    x = logits.astype("float64")  # temperature 1
    batch, vocab = x.shape
    seeds = samplers.row_seeds(11, batch)
    top_p = np.float32([SHORTCUT_P[r % len(SHORTCUT_P)] for r in range(batch)])
    top_k = np.int32([[0, 0, 300, 2500, 30_000][r % 5] for r in range(batch)])
    k = np.where(top_k > 0, top_k, vocab).astype("int32")
    literal, ours = [], []
    for r in range(batch):
        kept = samplers.kept_tokens_by_sort(x[r:r + 1], int(k[r]), np.float64(top_p[r]))
        noise = samplers.gumbel(seeds[r:r + 1], 5, vocab)
        literal.append(np.argmax(np.where(kept, x[r] + noise, -np.inf), -1)[0])
        ours.append(samplers.sample(logits[r:r + 1], seeds[r:r + 1], 5, 1.0, int(top_k[r]),
                                    float(top_p[r]))[0])
    np.testing.assert_array_equal(ours, literal)

    def twin(rows):  # the twin's draw for these rows, as one batch
        return sampling.next_token(
            tf.constant(logits[rows]), tf.ones([len(rows)]), tf.constant(top_k[rows]),
            tf.constant(top_p[rows]), tf.constant(seeds[rows]), tf.constant(5)).numpy()

    # Row by row (decided from 1024 or 16384 candidates, or ranked in full), and as one
    # batch (a row that neither decides ranks the whole batch in full).
    np.testing.assert_array_equal([twin([r])[0] for r in range(batch)], literal)
    np.testing.assert_array_equal(twin(list(range(batch))), literal)

    p64 = tf.constant(top_p.astype("float64"))
    full = sampling.kept_tokens(tf.constant(x), tf.constant(k), p64).numpy()
    decided_at = []
    for m in sampling.CANDIDATES:
        values, order = tf.math.top_k(tf.constant(x), m)
        keep, decided = (t.numpy() for t in sampling.candidates_keep(
            tf.constant(x), values, tf.constant(k), p64))
        for r in np.flatnonzero(decided):
            kept = np.zeros(vocab, bool)
            kept[order.numpy()[r][keep[r]]] = True
            np.testing.assert_array_equal(kept, full[r], err_msg=f"row {r}, {m} candidates")
        decided_at.append(int(decided.sum()))
    # Both counts decide some rows, the second more; others go to the full ranking.
    assert 8 <= decided_at[0] < decided_at[1] < batch, decided_at
