"""Next-token sampling, defined once: greedy, temperature, top-k, top-p, and top-k with top-p.

Every runtime follows this definition (the Keras model and the TFLite runtime through this
module, the SavedModel through its TensorFlow twin `gemma_keras.serving.sampling`), so one
seed and one set of settings give the same tokens in each. Given float32 logits [vocab]:

1. `temperature` 0 (sampler "greedy"): the argmax of the logits, ties to the lowest id.
2. Otherwise, in float64: `x = logits / temperature`, the temperature read as float32 (what
   the SavedModel receives).
3. top-k (`top_k` > 0; 0 or None: off): keep the `top_k` highest `x`, ranked by value, ties
   to the lower id.
4. top-p (`top_p` < 1; 1 or None: off; read as float32): among the tokens top-k kept, ranked
   as above, keep rank r while the tokens ranked before it hold less than `top_p` of their
   softmax probability (so the token that crosses `top_p` stays, and rank 0 always does).
5. Draw by Gumbel-max: the kept token with the highest `x + g(seed, step, id)`, ties to the
   lowest id, where `g = -log(-log(u))` and `u` comes from `uniform` below. This samples
   softmax(x) restricted to the kept tokens.

The random numbers are a counter-based stream: `u(seed, step, id)` in (0, 1) is an integer
hash of the row's seed, the index of the new token (0 for the first) and the token id,
computed in int64 with every product below 2**63, so NumPy and TensorFlow compute the same
bits. `row_seeds` gives the seed of each row of a batch.

Example:
>>> sampler = get_sampler("top_p", top_p=0.9, temperature=0.8)
>>> sampler(np.array([[0.0, 5.0, 1.0]], "float32"), row_seeds(0, 1), step=0)
array([1])
"""

from __future__ import annotations

import numpy as np

MASK32 = 0xFFFFFFFF
# The multiplier of the integer hash (a well-known 32-bit mixer). Below 2**27, so a 32-bit
# value times it stays below 2**59: int64 arithmetic never overflows, in NumPy or TensorFlow.
MIX_MULTIPLIER = 0x45D9F3B


def mix32(x):
    """A 32-bit integer hash of int64 values in [0, 2**32) (elementwise, NumPy)."""
    x = ((x >> 16) ^ x) * MIX_MULTIPLIER & MASK32
    x = ((x >> 16) ^ x) * MIX_MULTIPLIER & MASK32
    return (x >> 16) ^ x


def uniform(seeds, step, vocab_size):
    """float64 [batch, vocab] in (0, 1): `u(seeds[b], step, id)` of the random stream.

    The seed's two 32-bit halves and the step are hashed into one key per row; each id's
    hash is mixed with the key: `bits = mix32(mix32(id) ^ key)`, `u = (bits + 0.5) / 2**32`.
    """
    seeds = np.asarray(seeds, np.int64)
    return uniform_at(seeds[:, None], step, np.arange(vocab_size, dtype=np.int64)[None, :])


def uniform_at(seeds, step, ids):
    """`u(seeds, step, ids)` elementwise (int64 arrays that broadcast): the numbers `uniform`
    gives at those rows and ids, bit for bit."""
    seeds = np.asarray(seeds, np.int64)
    key = mix32(mix32(seeds & MASK32) ^ ((seeds >> 32) & MASK32))
    key = mix32(key ^ (np.int64(step) & MASK32))
    bits = mix32(mix32(np.asarray(ids, np.int64)) ^ key)
    return (bits + 0.5) / 2.0**32


def gumbel(seeds, step, vocab_size):
    """Gumbel(0, 1) noise [batch, vocab] (float64) of the random stream."""
    return -np.log(-np.log(uniform(seeds, step, vocab_size)))


def row_seeds(seed, batch_size):
    """The seeds of a batch's rows (int64 [batch]): `seed + b` for row b of an int `seed`, a
    sequence of one seed per row as given, and for None a fresh random seed (+ b)."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**63)
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        seeds = [int(seed) + b for b in range(batch_size)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != batch_size:
            raise ValueError(f"seed must be an int or one int per prompt; got {len(seeds)} "
                             f"seeds for {batch_size} prompts")
    # As int64 (two's complement), as TensorFlow's int64 seed input holds them.
    return np.array([(s + 2**63) % 2**64 - 2**63 for s in seeds], np.int64)


def ranked_ids(x, k):
    """Ids [batch, k] of the `k` highest float64 scores `x` [batch, vocab] per row, ranked by
    value, ties to the lower id (a stable sort of `-x`, done on the candidates only)."""
    if k == x.shape[-1]:
        return np.argsort(-x, axis=-1, kind="stable")
    rows = []
    for row in x:
        kth = np.partition(row, row.size - k)[row.size - k]  # the k-th highest value
        candidates = np.flatnonzero(row >= kth)  # ascending ids: stable sort keeps ties so
        rows.append(candidates[np.argsort(-row[candidates], kind="stable")][:k])
    return np.stack(rows)


def kept_tokens_by_sort(x, k, top_p):
    """bool [batch, vocab]: step 3 and 4 of the definition read literally, over the `k`
    highest scores of float64 `x` ranked in full (`top_p` already read as float64)."""
    batch = x.shape[0]
    order = ranked_ids(x, k)
    keep = np.ones((batch, k), bool)
    if top_p < 1:
        ranked = np.take_along_axis(x, order, -1)
        weights = np.exp(ranked - ranked[:, :1])
        cumulative = np.cumsum(weights, axis=-1)
        before = np.concatenate([np.zeros((batch, 1)), cumulative[:, :-1]], axis=-1)
        keep = before < top_p * cumulative[:, -1:]
    kept = np.zeros(x.shape, bool)
    np.put_along_axis(kept, order, keep, axis=-1)
    return kept


# The candidate counts top-p tries, smallest first, while they are under half of the `k`
# it ranks among (a peaked row needs the first; a flat one goes to the full ranking).
TOP_P_CANDIDATES = (2**10, 2**12, 2**14, 2**16)


def top_p_ids(row, k, top_p):
    """The ids top-p keeps (after top-k) of one float64 row, by ranking only the fewest
    candidates that provably hold them; None when that cannot be decided without ranking
    all `k` (then `kept_tokens_by_sort` decides).

    The definition keeps rank r while `before[r] < top_p * total`, where `before` and
    `total` are sums taken in rank order. A prefix of the ranking gives `before` of its
    ranks bit for bit (a cumulative sum adds in order); the total of all `k` weights, summed
    here in another order, is within `margin` (relative) of the sum in rank order (the
    rounding error of a sum of n non-negative numbers is below n * 2**-53 of it). A rank is
    decided when its `before` is below the threshold's lower bound (kept) or at or above its
    upper bound (dropped); the prefix suffices when the mass it holds reaches the upper bound.
    """
    scores = row - row.max()
    # float32 weights only guess which candidate counts hold enough mass (cheaply: a flat
    # row goes straight to the full ranking); the float64 ones below decide.
    guess = np.exp(np.maximum(scores, -200.0).astype(np.float32))
    guess = guess if k == row.size else np.partition(guess, row.size - k)[row.size - k:]
    enough = top_p * guess.sum(dtype=np.float64) * 1.001

    def holds_enough(m):  # the m highest guessed weights
        return np.partition(guess, k - m)[k - m:].sum(dtype=np.float64) >= enough

    counts = [m for m in TOP_P_CANDIDATES if m < k // 2]
    if not counts or not holds_enough(counts[-1]):  # a flat row
        return None
    while len(counts) > 1 and not holds_enough(counts[0]):
        counts.pop(0)
    weights = np.exp(scores)  # of every id, as the full ranking computes them
    top = weights if k == row.size else np.partition(weights, row.size - k)[row.size - k:]
    total = top.sum()
    if not np.isfinite(total):  # inf or nan scores: the full ranking decides
        return None
    margin = 4.0 * k * np.finfo(np.float64).eps
    low, high = top_p * total * (1 - margin), top_p * total * (1 + margin)
    for m in counts:
        order = ranked_ids(row[None], m)[0]
        cumulative = np.cumsum(weights[order])
        if cumulative[-1] < high:  # summed in rank order, the mass falls just short
            continue
        before = np.concatenate([[0.0], cumulative[:-1]])  # rank m and later: dropped
        if np.any((before >= low) & (before < high)):
            return None
        return order[before < low]
    return None


def kept_tokens(x, top_k=0, top_p=1.0):
    """bool [batch, vocab]: the tokens top-k and top-p keep of float64 scores `x` (step 3
    and 4 of the definition; `top_p` already read as float32). Top-p ranks only as many
    candidates as it needs (`top_p_ids`): the same tokens as ranking the whole row."""
    batch, vocab = x.shape
    k = vocab if not top_k else min(int(top_k), vocab)
    if k == vocab and top_p >= 1:
        return np.ones(x.shape, bool)
    if top_p >= 1 or k < 2 * TOP_P_CANDIDATES[0]:
        return kept_tokens_by_sort(x, k, top_p)
    kept = np.zeros(x.shape, bool)
    for b, row in enumerate(x):
        ids = top_p_ids(row, k, top_p)
        if ids is None:
            kept[b] = kept_tokens_by_sort(row[None], k, top_p)[0]
        else:
            kept[b, ids] = True
    return kept


def sample(logits, seeds, step, temperature=0.0, top_k=0, top_p=1.0):
    """Token ids [batch] from logits [batch, vocab] by the definition above; `seeds` [batch]
    (int64, see `row_seeds`), `step` the index of the new token."""
    logits = np.asarray(logits)
    temperature = np.float32(temperature)
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    x = logits.astype(np.float64) / np.float64(temperature)
    kept = kept_tokens(x, top_k or 0, np.float64(np.float32(1.0 if top_p is None else top_p)))
    if kept.all():
        return np.argmax(x + gumbel(seeds, step, x.shape[-1]), axis=-1)
    # The noise of the kept tokens only: the same numbers, at a fraction of the cost.
    rows, ids = np.nonzero(kept)
    scores = np.full(x.shape, -np.inf)
    scores[rows, ids] = x[rows, ids] - np.log(-np.log(uniform_at(
        np.asarray(seeds, np.int64)[rows], step, ids)))
    return np.argmax(scores, axis=-1)


# --------------------------------------------------------------------------- samplers
def _is_number(value):
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and bool(np.isfinite(value)))


class Sampler:
    """Settings of the one sampling definition: `temperature` (0: greedy), `top_k` (0 or
    None: off), `top_p` (1 or None: off). `sampler(logits [B, V], seeds [B], step) -> ids [B]`.
    """

    name = "sample"

    def __init__(self, temperature=1.0, top_k=None, top_p=None):
        if not _is_number(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got "
                             f"{temperature!r}")
        self.temperature = float(temperature)
        if top_k is not None and (not isinstance(top_k, (int, np.integer))
                                  or isinstance(top_k, bool) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer (0: off), got {top_k!r}")
        self.top_k = int(top_k or 0)
        if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p!r}")
        self.top_p = 1.0 if top_p is None else float(top_p)

    @property
    def is_random(self):
        return self.temperature > 0

    def __call__(self, logits, seeds, step):
        return sample(logits, seeds, step, self.temperature, self.top_k, self.top_p)

    def __repr__(self):
        return (f"{type(self).__name__}(temperature={self.temperature}, top_k={self.top_k}, "
                f"top_p={self.top_p})")


class GreedySampler(Sampler):
    """The most likely token (ties: the lowest id, as `argmax` in transformers)."""

    name = "greedy"

    def __init__(self):
        super().__init__(temperature=0.0)


class TemperatureSampler(Sampler):
    """Sample from softmax(logits / temperature) over the whole vocabulary."""

    name = "temperature"


class TopKSampler(Sampler):
    """Sample among the `k` most likely tokens, at `temperature` (and `top_p`, if given)."""

    name = "top_k"

    def __init__(self, k=50, temperature=1.0, top_p=None):
        super().__init__(temperature, top_k=k, top_p=top_p)


class TopPSampler(Sampler):
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches
    `p` (the token that crosses `p` included), at `temperature` (after `top_k`, if given)."""

    name = "top_p"

    def __init__(self, p=0.9, temperature=1.0, top_k=None):
        super().__init__(temperature, top_k=top_k, top_p=p)


class KerasHubSampler(Sampler):
    """Adapter for a `keras_hub.samplers.Sampler` (its own seed; runs eagerly)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.name = f"keras_hub.{type(sampler).__name__}"

    @property
    def is_random(self):
        return type(self.sampler).__name__ != "GreedySampler"

    def __call__(self, logits, seeds=None, step=None):
        probs = self.sampler.compute_probabilities(logits)
        return np.asarray(self.sampler.get_next_token(probs)).astype(np.int64)

    def __repr__(self):
        return f"KerasHubSampler({self.sampler!r})"


SAMPLERS = {"greedy": GreedySampler, "temperature": TemperatureSampler,
            "top_k": TopKSampler, "top_p": TopPSampler}


def get_sampler(sampler="greedy", temperature=None, top_k=None, top_p=None) -> Sampler:
    """A `Sampler` from a name ("greedy", "temperature", "top_k", "top_p") and settings.

    A `Sampler` instance (or a keras-hub sampler) is returned as is; then the settings must
    be left None. The name sets the defaults: `temperature` 1.0, `top_k` 50 for "top_k",
    `top_p` 0.9 for "top_p"; the settings given combine (top-k, then top-p). "greedy" takes
    neither top-k nor top-p.
    """
    settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    given = {k: v for k, v in settings.items() if v is not None}
    if isinstance(sampler, Sampler):
        if given:
            raise ValueError(f"pass {sorted(given)} to the sampler's constructor, not "
                             f"alongside a {type(sampler).__name__} instance")
        return sampler
    if type(sampler).__module__.startswith("keras_hub"):
        return KerasHubSampler(sampler)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)} or a Sampler, "
                         f"got {sampler!r}")
    temperature = 1.0 if temperature is None else temperature
    if sampler == "greedy":
        unused = sorted(k for k in given if k != "temperature")
        if unused:
            raise ValueError(f"{unused} have no effect with sampler='greedy'")
        return GreedySampler()
    if sampler == "top_k" and top_k is None:
        top_k = 50
    if sampler == "top_p" and top_p is None:
        top_p = 0.9
    return Sampler(temperature, top_k=top_k, top_p=top_p)
