"""Text generation from a `Gemma2CausalLM` with a KV cache: prefill once, then one token a step.

The batch is left-padded so that every row ends at the same cache slot; row b starts at slot
`start[b]` (the backbone masks the slots before it and counts RoPE positions from it). The
prompt is run once (prefill), then each step feeds only the newest token and reads the past
from the cache. Both functions are compiled once per shape (XLA through
`tf.function(jit_compile=True)` on TensorFlow, `jax.jit` on JAX, eager on PyTorch) and kept
on the model, so repeated calls do not retrace. Prompt lengths are rounded up to a multiple
of `PROMPT_BUCKET` and the cache to a multiple of `CACHE_BUCKET`, so nearby lengths share one
compiled function. Sampling (see `gemma_keras.samplers`) runs on the host.

Example:
>>> lm = Gemma2CausalLM.from_pretrained("my_model")
>>> lm.generate("The capital of France is", max_new_tokens=8)
>>> lm.generate([[2, 651, 6037], [2, 1841]], max_new_tokens=4)    # token ids in, ids out
>>> for piece in lm.stream("Tell me a story", sampler="top_p", seed=0):
...     print(piece, end="", flush=True)
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from gemma_keras.samplers import get_sampler

PROMPT_BUCKET = 16
CACHE_BUCKET = 64


def _round_up(n, multiple):
    return int(math.ceil(n / multiple) * multiple)


# ---------------------------------------------------------------- compiled steps
class Generator:
    """The compiled prefill and decode-step functions of one model, cached by shape.

    `prefill(token_ids [B, P], start [B], cache_length)` -> `(logits [B, V], cache)`: runs the
    left-padded prompts into a new cache of `cache_length` slots; logits of the last slot.
    `step(token_ids [B, 1], cache, cache_index, start)` -> `(logits [B, V], cache)`: one token
    per row at slot `cache_index`.
    Logits are float32 NumPy arrays; the cache stays on the backend.
    """

    def __init__(self, model):
        self.model = model
        self.backend = keras.backend.backend()
        self._compiled = {}
        self._variables_key = None
        self.trace_counts = {}  # how often each compiled function was traced (for tests)

    # ---- the model math (traced by the compiler)
    def _prefill_fn(self, cache_length):
        backbone = self.model.backbone

        def prefill(token_ids, start):
            self._count_trace(("prefill", tuple(token_ids.shape), cache_length))
            cache = backbone.init_cache(ops.shape(token_ids)[0], cache_length)
            hidden, cache = backbone.call_with_cache(token_ids, cache, 0, start=start)
            return self.model.logits(hidden[:, -1, :]), cache

        return prefill

    def _step_fn(self):
        backbone = self.model.backbone

        def step(token_ids, cache, cache_index, start):
            self._count_trace(("step", tuple(token_ids.shape), tuple(cache[0][0].shape)))
            hidden, cache = backbone.call_with_cache(token_ids, cache, cache_index, start=start)
            return self.model.logits(hidden[:, -1, :]), cache

        return step

    def _count_trace(self, key):
        self.trace_counts[key] = self.trace_counts.get(key, 0) + 1

    # ---- compilation per backend
    def _compile(self, fn, donate_cache=False):
        if self.backend == "tensorflow":
            import tensorflow as tf

            return tf.function(fn, jit_compile=True)
        if self.backend == "jax":
            return self._jax_compile(fn, donate_cache)
        if self.backend == "torch":
            import torch

            def no_grad(*args):
                with torch.no_grad():
                    return fn(*args)

            return no_grad
        return fn

    def _jax_compile(self, fn, donate_cache):
        import jax

        variables = self.model.variables

        def stateless(state, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, state))):
                return fn(*args)

        jitted = jax.jit(stateless, donate_argnums=(2,) if donate_cache else ())
        return lambda *args: jitted([v.value for v in variables], *args)

    def _get(self, key, make, new_call=False):
        # Keyed on the model's variables too: enable_lora or quantize swap them, and a
        # function traced before would still read the old ones. (Looked up once per
        # prefill: listing a big model's variables every step would cost time.)
        if new_call or self._variables_key is None:
            self._variables_key = tuple(id(v) for v in self.model.variables)
        key = (key, self._variables_key)
        if key not in self._compiled:
            self._compiled[key] = make()
        return self._compiled[key]

    # ---- the two entry points
    def prefill(self, token_ids, start, cache_length):
        token_ids = np.asarray(token_ids, np.int32)
        fn = self._get(("prefill", token_ids.shape, cache_length),
                       lambda: self._compile(self._prefill_fn(cache_length)), new_call=True)
        logits, cache = fn(ops.convert_to_tensor(token_ids),
                           ops.convert_to_tensor(np.asarray(start, np.int32)))
        return np.asarray(ops.convert_to_numpy(logits)), cache

    def step(self, token_ids, cache, cache_index, start):
        token_ids = np.asarray(token_ids, np.int32)
        key = ("step", token_ids.shape, tuple(cache[0][0].shape))
        fn = self._get(key, lambda: self._compile(self._step_fn(), donate_cache=True))
        logits, cache = fn(ops.convert_to_tensor(token_ids), cache,
                           ops.convert_to_tensor(np.int32(cache_index)),
                           ops.convert_to_tensor(np.asarray(start, np.int32)))
        return np.asarray(ops.convert_to_numpy(logits)), cache


def get_generator(model) -> Generator:
    """The model's `Generator` (created on first use, then kept on the model)."""
    generator = getattr(model, "_gemma_generator", None)
    if generator is None or generator.model is not model:
        generator = Generator(model)
        object.__setattr__(model, "_gemma_generator", generator)  # not a tracked attribute
    return generator


# --------------------------------------------------------------------- checks
def _check_positive_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _prompt_ids(model, prompts):
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
    is_text = all(isinstance(p, str) for p in prompts)
    if is_text:
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer: attach one (model.tokenizer = "
                             "GemmaTokenizer(path)) or pass token-id lists")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is an empty string")
        return [tokenizer.encode(p) for p in prompts], True, single
    vocab = model.config.vocab_size
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str) or not isinstance(p, (list, tuple, np.ndarray)):
            raise ValueError(f"prompt {i} must be a token-id list (prompts cannot mix text "
                             f"and ids), got {type(p).__name__}")
        row = [int(t) for t in p]
        if not row:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
        ids.append(row)
    return ids, False, single


def _stop_ids(config, stop_token_ids):
    """The stop ids as a set: `<eos>` and `<end_of_turn>` unless given."""
    if stop_token_ids is None:
        return {config.eos_token_id, config.end_of_turn_id}
    if isinstance(stop_token_ids, (int, np.integer)):
        stop_token_ids = [stop_token_ids]
    return {int(t) for t in stop_token_ids}


def _fit_to_limit(ids, max_new_tokens, limit, truncate, bos_id):
    """Refuse (or, when `truncate`, cut from the left after `<bos>`) prompts that would run
    past `limit` tokens with `max_new_tokens` more."""
    if max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be less than the length "
                         f"limit ({limit})")
    room = limit - max_new_tokens
    out = []
    for i, row in enumerate(ids):
        if len(row) > room:
            if not truncate:
                raise ValueError(
                    f"prompt {i} has {len(row)} tokens; with max_new_tokens={max_new_tokens} "
                    f"that exceeds the limit of {limit} tokens (max_length or the model's "
                    f"context). Shorten it, lower max_new_tokens, or pass truncate=True to "
                    f"keep only its last {room} tokens"
                )
            keep_bos = row[0] == bos_id and room > 1
            row = ([row[0]] if keep_bos else []) + row[len(row) - room + keep_bos:]
        out.append(row)
    return out


# ------------------------------------------------------------------ the loop
def generate_ids(model, prompts, max_new_tokens=64, sampler="greedy", stop_token_ids=None,
                 seed=None, max_length=None, truncate=False, temperature=None, top_k=None,
                 top_p=None):
    """Yield, for each decoding step, the new token of every row as `(ids [B], alive [B])`.

    `prompts` is a list of non-empty token-id lists. `alive[b]` is False for rows that have
    already stopped (their `ids[b]` is padding); a row's stop token is yielded with alive
    True, and the row is dead from the next step on. See `generate` for the arguments.
    """
    config = model.config
    max_new_tokens = _check_positive_int("max_new_tokens", max_new_tokens)
    sampler = get_sampler(sampler, temperature=temperature, top_k=top_k, top_p=top_p)
    limit = config.max_position_embeddings
    if max_length is not None:
        max_length = _check_positive_int("max_length", max_length)
        if max_length > limit:
            raise ValueError(f"max_length ({max_length}) exceeds the model's context "
                             f"({limit} positions)")
        limit = max_length
    prompts = _fit_to_limit(prompts, max_new_tokens, limit, truncate, config.bos_token_id)
    stop = np.array(sorted(_stop_ids(config, stop_token_ids)), np.int64)
    rng = np.random.default_rng(seed)

    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    prompt_slots = _round_up(lengths.max(), PROMPT_BUCKET)
    cache_length = _round_up(prompt_slots + max_new_tokens, CACHE_BUCKET)
    start = prompt_slots - lengths
    token_ids = np.full((batch, prompt_slots), config.pad_token_id, np.int32)
    for b, p in enumerate(prompts):
        token_ids[b, start[b]:] = p

    generator = get_generator(model)
    logits, cache = generator.prefill(token_ids, start, cache_length)
    alive = np.ones(batch, bool)
    for t in range(max_new_tokens):
        ids = np.where(alive, sampler(logits, rng), config.pad_token_id).astype(np.int32)
        yield ids, alive.copy()
        alive &= ~np.isin(ids, stop)
        if t == max_new_tokens - 1 or not alive.any():
            return
        logits, cache = generator.step(ids[:, None], cache, prompt_slots + t, start)


def generate(model, prompts, max_new_tokens=64, sampler="greedy", stop_token_ids=None,
             seed=None, max_length=None, truncate=False, temperature=None, top_k=None,
             top_p=None):
    """Complete `prompts` with up to `max_new_tokens` tokens each.

    Args:
      prompts: a string or a list of strings (needs `model.tokenizer`; `<bos>` is added), or
        a token-id list or a list of token-id lists of any lengths.
      max_new_tokens: the most tokens to add per prompt (> 0).
      sampler: "greedy", "temperature", "top_k", "top_p", or a `gemma_keras.samplers.Sampler`
        (or keras-hub sampler); `temperature`, `top_k`, `top_p` set the named ones.
      stop_token_ids: a row stops after producing one of these (default `<eos>` and
        `<end_of_turn>`); `()` never stops early.
      seed: makes sampling reproducible.
      max_length: the most tokens (prompt + new) per row; defaults to the model's context.
      truncate: when a prompt plus `max_new_tokens` exceeds the limit, keep its last tokens
        (and `<bos>`) instead of raising ValueError.

    Returns the completions only (the stop token left out), in the form of `prompts`: a
    string, a list of strings, a list of ids, or a list of id lists.
    """
    ids, is_text, single = _prompt_ids(model, prompts)
    completions = [[] for _ in ids]
    stop = _stop_ids(model.config, stop_token_ids)
    for step_ids, alive in generate_ids(model, ids, max_new_tokens, sampler, stop_token_ids,
                                        seed, max_length, truncate, temperature, top_k, top_p):
        for b in np.flatnonzero(alive):
            if int(step_ids[b]) not in stop:
                completions[b].append(int(step_ids[b]))
    if is_text:
        completions = [model.tokenizer.decode(c) for c in completions]
    return completions[0] if single else completions


def stream(model, prompt, max_new_tokens=64, sampler="greedy", stop_token_ids=None,
           seed=None, max_length=None, truncate=False, temperature=None, top_k=None,
           top_p=None):
    """Yield the completion of one prompt as it is produced.

    A string prompt yields text pieces (joined, they equal `generate`'s string); a token-id
    list yields token ids. The stop token is not yielded. Arguments as in `generate`.
    """
    ids, is_text, single = _prompt_ids(model, prompt)
    if not single:
        raise ValueError("stream takes one prompt (a string or a token-id list); use "
                         "generate for a batch")
    stop = _stop_ids(model.config, stop_token_ids)
    tokens, shown = [], ""
    for step_ids, _ in generate_ids(model, ids, max_new_tokens, sampler, stop_token_ids, seed,
                                    max_length, truncate, temperature, top_k, top_p):
        token = int(step_ids[0])
        if token in stop:
            break
        if not is_text:
            yield token
            continue
        tokens.append(token)
        text = model.tokenizer.decode(tokens)
        # Hold back a piece that ends inside a multi-byte character (byte fallback).
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    if is_text:
        text = model.tokenizer.decode(tokens)
        if len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown):]
