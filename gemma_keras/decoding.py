"""The host decode loop that every runtime's `generate` and `stream` use, over a small backend.

Pure NumPy (no TensorFlow, no Keras), so the TFLite runtime and the chat command run without
them. A runtime supplies a `DecodeBackend` (the Keras model: `gemma_keras.generation`; a
`.tflite` file: `gemma_keras.tflite.runtime`); this module does the rest, the same way for
both: it checks the prompts, fits them to the backend's length limit, prefills them, then
samples one token per row a step (`gemma_keras.samplers`, one seed per row) until every row
has produced a stop token or `max_new_tokens` tokens. The SavedModel's in-graph loop
(`gemma_keras.serving.module`) follows the same rules.

Both runtimes' `generate(prompts, max_new_tokens=None, sampler="greedy", *, seed=None,
stop_token_ids=None, temperature=None, top_k=None, top_p=None, max_length=None,
truncate=False)` and `stream(prompt, ...)` take the arguments documented on `generate` below.
"""

from __future__ import annotations

import itertools
from typing import Protocol

import numpy as np

from gemma_keras import defaults
from gemma_keras.samplers import get_sampler, row_seeds
from gemma_keras.tokenizer import stream_text


class DecodeBackend(Protocol):
    """What the decode loop needs from a runtime.

    `capacity`: the most tokens (prompt and new) one row may hold; `limit_note` says where
    that limit comes from, in error messages. `max_batch_size`: the most prompts one generation may take.
    `vocab_size`, `stop_ids` (the default stop tokens), `bos_id`, `pad_id`.
    `prefill(prompts, max_new_tokens)`: run the prompts (lists of ids) into a fresh cache
    with room for `max_new_tokens` more; the float32 logits [batch, vocab] after each.
    `step(token_ids [batch])`: feed one token per row; the logits [batch, vocab] after it.
    """

    capacity: int
    limit_note: str
    max_batch_size: int | None
    vocab_size: int
    stop_ids: tuple
    bos_id: int
    pad_id: int

    def prefill(self, prompts: list, max_new_tokens: int) -> np.ndarray: ...

    def step(self, token_ids: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------------- checks
def check_positive_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_token_ids(row, vocab_size, what="prompt"):
    """`row` as a list of ints, refused when empty or outside [0, vocab_size)."""
    if isinstance(row, str) or not isinstance(row, (list, tuple, np.ndarray)):
        raise ValueError(f"{what} must be a token-id list (prompts cannot mix text and ids), "
                         f"got {type(row).__name__}")
    row = [int(t) for t in row]
    if not row:
        raise ValueError(f"{what} is empty")
    bad = [t for t in row if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} has token ids outside [0, {vocab_size}): {bad[:5]}")
    return row


def prompt_ids(prompts, tokenizer, vocab_size):
    """Normalise `prompts` to a list of id lists; also say whether text came in, and
    whether a single prompt did (so the result takes the same form)."""
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    single = isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and prompts
        and all(isinstance(t, (int, np.integer)) for t in prompts))
    if single:
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a string, a list of strings, or a list of token-id "
                         f"lists, and not empty; got {prompts!r}")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (the model's tokenizer.model); "
                             "without one, pass token-id lists")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is an empty string")
        return [tokenizer.encode(p) for p in prompts], True, single
    return [check_token_ids(p, vocab_size, f"prompt {i}") for i, p in enumerate(prompts)], \
        False, single


def stop_id_set(stop_token_ids, default):
    """The stop ids as a set: `default` unless given (an int or ids; `()` never stops)."""
    if stop_token_ids is None:
        return set(default)
    if isinstance(stop_token_ids, (int, np.integer)):
        stop_token_ids = [stop_token_ids]
    return {int(t) for t in stop_token_ids}


def _limit(backend, max_length):
    limit = backend.capacity
    if max_length is None:
        return limit
    max_length = check_positive_int("max_length", max_length)
    if max_length > limit:
        raise ValueError(f"max_length ({max_length}) exceeds the limit of {limit} positions "
                         f"({backend.limit_note})")
    return max_length


def fit_to_limit(ids, max_new_tokens, limit, truncate, bos_id, limit_note):
    """Refuse (or, when `truncate`, cut from the left after `<bos>`) prompts that would run
    past `limit` tokens with `max_new_tokens` more; `limit_note` names the limit."""
    if max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be less than the length "
                         f"limit of {limit} tokens (max_length, or {limit_note})")
    room = limit - max_new_tokens
    out = []
    for i, row in enumerate(ids):
        if len(row) > room:
            if not truncate:
                raise ValueError(
                    f"prompt {i} has {len(row)} tokens; with max_new_tokens={max_new_tokens} "
                    f"that exceeds the limit of {limit} tokens (max_length, or {limit_note}). "
                    f"Shorten it, lower max_new_tokens, or pass truncate=True to keep only "
                    f"its last {room} tokens")
            keep_bos = row[0] == bos_id and room > 1
            row = ([row[0]] if keep_bos else []) + row[len(row) - room + keep_bos:]
        out.append(row)
    return out


# ------------------------------------------------------------------ the loop
def decode_steps(backend, prompts, max_new_tokens=None, sampler="greedy", *, seed=None,
                 stop_token_ids=None, temperature=None, top_k=None, top_p=None,
                 max_length=None, truncate=False):
    """Yield, for each decoding step, the new token of every row as `(ids [B], alive [B])`.

    `prompts` is a list of non-empty token-id lists. `alive[b]` is False for rows that have
    already stopped (their `ids[b]` is padding); a row's stop token is yielded with alive
    True, and the row is dead from the next step on. Arguments as in `generate`.
    """
    sampler = get_sampler(sampler, temperature=temperature, top_k=top_k, top_p=top_p)
    if backend.max_batch_size is not None and len(prompts) > backend.max_batch_size:
        raise ValueError(f"{len(prompts)} prompts; this runtime takes at most "
                         f"{backend.max_batch_size} at a time")
    limit = _limit(backend, max_length)
    max_new_tokens = check_positive_int("max_new_tokens", defaults.max_new_tokens(
        max_new_tokens, max(len(p) for p in prompts), limit))
    prompts = fit_to_limit(prompts, max_new_tokens, limit, truncate, backend.bos_id,
                           backend.limit_note)
    stop = np.array(sorted(stop_id_set(stop_token_ids, backend.stop_ids)), np.int64)
    seeds = row_seeds(seed, len(prompts))

    logits = backend.prefill(prompts, max_new_tokens)
    alive = np.ones(len(prompts), bool)
    for t in range(max_new_tokens):
        ids = np.where(alive, sampler(logits, seeds, t), backend.pad_id).astype(np.int32)
        yield ids, alive.copy()
        alive &= ~np.isin(ids, stop)
        if t == max_new_tokens - 1 or not alive.any():
            return
        logits = backend.step(ids)


def generate(backend, tokenizer, prompts, max_new_tokens=None, sampler="greedy", **kwargs):
    """Complete `prompts` with up to `max_new_tokens` tokens each.

    Args:
      prompts: a string or a list of strings (needs a tokenizer; `<bos>` is added), or a
        token-id list or a list of token-id lists of any lengths.
      max_new_tokens: the most tokens to add per prompt (> 0); default 64, or what the
        longest prompt leaves of the limit.
      sampler: "greedy", "temperature", "top_k", "top_p", or a `gemma_keras.samplers.Sampler`
        (or keras-hub sampler); `temperature`, `top_k`, `top_p` set the named ones and
        combine (see `gemma_keras.samplers` for the one definition every runtime follows).
      seed: makes sampling reproducible: row b of a batch draws with `seed + b` (or give one
        seed per prompt); None draws a fresh seed.
      stop_token_ids: a row stops after producing one of these (default `<eos>` and
        `<end_of_turn>`); `()` never stops early.
      max_length: the most tokens (prompt + new) per row; defaults to the runtime's limit
        (the model's context, the `.tflite` file's cache).
      truncate: when a prompt plus `max_new_tokens` exceeds the limit, keep its last tokens
        (and `<bos>`) instead of raising ValueError.

    Returns the completions only (the stop token left out), in the form of `prompts`: a
    string, a list of strings, a list of ids, or a list of id lists.
    """
    ids, is_text, single = prompt_ids(prompts, tokenizer, backend.vocab_size)
    completions = [[] for _ in ids]
    stop = stop_id_set(kwargs.get("stop_token_ids"), backend.stop_ids)
    for step_ids, alive in decode_steps(backend, ids, max_new_tokens, sampler, **kwargs):
        for b in np.flatnonzero(alive):
            if int(step_ids[b]) not in stop:
                completions[b].append(int(step_ids[b]))
    if is_text:
        completions = [tokenizer.decode(c) for c in completions]
    return completions[0] if single else completions


def stream(backend, tokenizer, prompt, max_new_tokens=None, sampler="greedy", **kwargs):
    """Yield the completion of one prompt as it is produced.

    A string prompt yields text pieces (joined, they equal `generate`'s string); a token-id
    list yields token ids. The stop token is not yielded. Arguments as in `generate`.
    """
    ids, is_text, single = prompt_ids(prompt, tokenizer, backend.vocab_size)
    if not single:
        raise ValueError("stream takes one prompt (a string or a token-id list); use "
                         "generate for a batch")
    stop = stop_id_set(kwargs.get("stop_token_ids"), backend.stop_ids)
    steps = decode_steps(backend, ids, max_new_tokens, sampler, **kwargs)
    tokens = itertools.takewhile(lambda t: t not in stop, (int(s[0]) for s, _ in steps))
    yield from stream_text(tokenizer, tokens) if is_text else tokens
