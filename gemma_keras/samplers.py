"""Next-token samplers: greedy, temperature, top-k, top-p.

A sampler maps float32 logits [batch, vocab] (NumPy) and a `numpy.random.Generator` to token
ids [batch]. Sampling runs on the host, after the compiled model step, so that changing the
sampler or its settings never recompiles the step, and a seed gives the same tokens on every
Keras backend. (keras-hub's samplers draw from a Keras `SeedGenerator` inside their own
`while_loop`; they are accepted too, through `get_sampler`, and run eagerly.)

Example:
>>> sampler = get_sampler("top_p", top_p=0.9, temperature=0.8)
>>> sampler(np.array([[0.0, 5.0, 1.0]], "float32"), np.random.default_rng(0))
array([1])
"""

from __future__ import annotations

import numpy as np


class Sampler:
    """Base class: `sampler(logits [B, V], rng) -> ids [B]`."""

    name = "sampler"
    is_random = True

    def __call__(self, logits, rng):
        raise NotImplementedError

    def __repr__(self):
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_temperature(temperature):
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (
            temperature > 0 and np.isfinite(temperature)):
        raise ValueError(
            f"temperature must be a positive number when sampling, got {temperature!r} "
            "(use sampler='greedy' for deterministic decoding)"
        )
    return float(temperature)


def _sample_from_logits(logits, rng):
    """Draw one index per row from softmax(logits) by inverse CDF (float64, reproducible)."""
    logits = logits.astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(len(logits)) * cdf[:, -1]
    ids = np.array([np.searchsorted(row, x, side="right") for row, x in zip(cdf, u)])
    return np.minimum(ids, logits.shape[-1] - 1)


class GreedySampler(Sampler):
    """The most likely token (ties: the lowest id, as `argmax` in transformers)."""

    name = "greedy"
    is_random = False

    def __call__(self, logits, rng=None):
        return np.argmax(logits, axis=-1)


class TemperatureSampler(Sampler):
    """Sample from softmax(logits / temperature) over the whole vocabulary."""

    name = "temperature"

    def __init__(self, temperature=1.0):
        self.temperature = _check_temperature(temperature)

    def __call__(self, logits, rng):
        return _sample_from_logits(np.asarray(logits) / self.temperature, rng)


class TopKSampler(Sampler):
    """Sample among the `k` most likely tokens, at `temperature`."""

    name = "top_k"

    def __init__(self, k=50, temperature=1.0):
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"top_k must be a positive integer, got {k!r}")
        self.k = int(k)
        self.temperature = _check_temperature(temperature)

    def __call__(self, logits, rng):
        logits = np.asarray(logits)
        k = min(self.k, logits.shape[-1])
        top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(logits, top, -1), -1), -1)
        choice = _sample_from_logits(np.take_along_axis(logits, top, -1) / self.temperature, rng)
        return top[np.arange(len(top)), choice]


class TopPSampler(Sampler):
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches
    `p` (the token that crosses `p` included), at `temperature`."""

    name = "top_p"

    def __init__(self, p=0.9, temperature=1.0):
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        self.p = float(p)
        self.temperature = _check_temperature(temperature)

    def __call__(self, logits, rng):
        logits = np.asarray(logits, np.float64) / self.temperature
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, -1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        before = np.cumsum(probs, -1) - probs  # probability of the more likely tokens
        sorted_logits[before >= self.p] = -np.inf  # the first token is always kept
        choice = _sample_from_logits(sorted_logits, rng)
        return order[np.arange(len(order)), choice]


class KerasHubSampler(Sampler):
    """Adapter for a `keras_hub.samplers.Sampler` (its own seed; runs eagerly)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.name = f"keras_hub.{type(sampler).__name__}"
        self.is_random = type(sampler).__name__ != "GreedySampler"

    def __call__(self, logits, rng=None):
        probs = self.sampler.compute_probabilities(logits)
        return np.asarray(self.sampler.get_next_token(probs)).astype(np.int64)


SAMPLERS = {"greedy": GreedySampler, "temperature": TemperatureSampler,
            "top_k": TopKSampler, "top_p": TopPSampler}


def get_sampler(sampler="greedy", temperature=None, top_k=None, top_p=None) -> Sampler:
    """A `Sampler` from a name ("greedy", "temperature", "top_k", "top_p") and settings.

    A `Sampler` instance (or a keras-hub sampler) is returned as is; then the settings must
    be left None. With a name, `temperature` defaults to 1.0, `top_k` to 50, `top_p` to 0.9.
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
    if sampler == "temperature":
        if top_k is not None or top_p is not None:
            raise ValueError("top_k/top_p need sampler='top_k'/'top_p', not 'temperature'")
        return TemperatureSampler(temperature)
    if sampler == "top_k":
        if top_p is not None:
            raise ValueError("top_p has no effect with sampler='top_k'")
        return TopKSampler(50 if top_k is None else top_k, temperature)
    if top_k is not None:
        raise ValueError("top_k has no effect with sampler='top_p'")
    return TopPSampler(0.9 if top_p is None else top_p, temperature)
