"""Text generation from a `Gemma2CausalLM` with a KV cache: prefill once, then one token a step.

The batch is left-padded so that every row ends at the same cache slot; row b starts at slot
`start[b]` (the backbone masks the slots before it and counts RoPE positions from it). The
prompt is run once (prefill, `PREFILL_CHUNK` tokens at a time), then each step feeds only the
newest token and reads the past from the cache. One function does both: it runs T tokens per
row into the cache and returns the logits of the last; it is compiled once per shape (on
TensorFlow, `tf.function` with XLA (`jit_compile=True`); `jax.jit` with the cache donated on
JAX; eager on PyTorch) and kept on the model, so repeated calls do
not retrace. Prompts are left-padded to a multiple of `PREFILL_CHUNK`, and the cache has a
power-of-two number of slots (at least `MIN_CACHE`), so a batch size and cache size need
exactly two compilations (T = PREFILL_CHUNK and T = 1) whatever the prompt lengths. Sampling (see
`gemma_keras.samplers`) runs on the host.

Example:
>>> lm = Gemma2CausalLM.from_pretrained("my_model")
>>> lm.generate("The capital of France is", max_new_tokens=8)
>>> lm.generate([[2, 651, 6037], [2, 1841]], max_new_tokens=4)    # token ids in, ids out
>>> for piece in lm.stream("Tell me a story", sampler="top_p", seed=0):
...     print(piece, end="", flush=True)
"""

from __future__ import annotations

import itertools
import math

import keras
import numpy as np
from keras import ops

from gemma_keras import defaults
from gemma_keras.samplers import get_sampler
from gemma_keras.tokenizer import stream_text

PREFILL_CHUNK = 32
MIN_CACHE = 64


def _round_up(n, multiple):
    return int(math.ceil(n / multiple) * multiple)


def cache_slots(n):
    """Cache slots for `n` tokens: the next power of two (at least MIN_CACHE) up to 4096,
    then the next multiple of 1024."""
    if n > 4096:
        return _round_up(n, 1024)
    return max(MIN_CACHE, 1 << (int(n) - 1).bit_length())


# ---------------------------------------------------------------- compiled steps
class Generator:
    """The compiled step function of one model, cached by shape, and the prefill built on it.

    `step(token_ids [B, T], cache, cache_index, start)` -> `(logits [B, V], cache)`: runs T
    tokens per row into cache slots `cache_index ..`; the logits are those of the last slot.
    `prefill(token_ids [B, P], start, cache_length)` -> `(logits [B, V], cache)`: a new cache
    of `cache_length` slots, filled `PREFILL_CHUNK` tokens per step (P must be a multiple).
    Logits are float32 NumPy arrays; the cache stays on the backend.
    """

    def __init__(self, model):
        self.model = model
        self.backend = keras.backend.backend()
        self._compiled = {}
        self._variables_key = None
        self.trace_counts = {}  # how often each compiled function was traced (for tests)

    def _step_fn(self):
        backbone = self.model.backbone

        def step(token_ids, cache, cache_index, start):
            self._count_trace((tuple(token_ids.shape), tuple(cache[0][0].shape)))
            hidden, cache = backbone.call_with_cache(token_ids, cache, cache_index, start=start)
            return self.model.logits(hidden[:, -1, :]), cache

        return step

    def _count_trace(self, key):
        self.trace_counts[key] = self.trace_counts.get(key, 0) + 1

    # ---- compilation per backend
    def _compile(self, fn):
        if self.backend == "tensorflow":
            import tensorflow as tf

            # XLA for both shapes: with the [out, in] kernels its products run as fast as
            # TensorFlow's own kernels on prefill chunks (T = 32) and ~1.4x faster on the
            # decode step (T = 1, matrix-vector products bound by memory).
            return tf.function(fn, jit_compile=True)
        if self.backend == "jax":
            return self._jax_compile(fn)
        if self.backend == "torch":
            import torch

            def no_grad(*args):
                with torch.no_grad():
                    return fn(*args)

            return no_grad
        return fn

    def _jax_compile(self, fn):
        """`jax.jit` of `fn` with the model's variables passed in, and the cache (argument 2
        after the variables) donated so that it is updated in place."""
        import jax

        variables = self.model.variables

        def stateless(state, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, state))):
                return fn(*args)

        jitted = jax.jit(stateless, donate_argnums=(2,))
        return lambda *args: jitted([v.value for v in variables], *args)

    def _function(self, token_shape, cache_shape):
        key = (token_shape, cache_shape, self._variables_key)
        if key not in self._compiled:
            self._compiled[key] = self._compile(self._step_fn())
        return self._compiled[key]

    # ---- the two entry points
    def step(self, token_ids, cache, cache_index, start):
        token_ids = np.asarray(token_ids, np.int32)
        logits, cache = self._step(token_ids, cache, cache_index, start)
        return np.asarray(ops.convert_to_numpy(logits)), cache

    def _step(self, token_ids, cache, cache_index, start):
        slots = int(self.model.backbone.cache_slots(cache))
        if not 0 <= cache_index <= slots - token_ids.shape[1]:
            raise ValueError(f"{token_ids.shape[1]} token(s) at slot {cache_index} do not fit "
                             f"a cache of {slots} slots")
        if self._variables_key is None:
            self._refresh()
        fn = self._function(token_ids.shape, tuple(cache[0][0].shape))
        return fn(ops.convert_to_tensor(token_ids), cache,
                  ops.convert_to_tensor(np.int32(cache_index)),
                  ops.convert_to_tensor(np.asarray(start, np.int32)))

    def _refresh(self):
        # The compiled functions are keyed on the model's variables too: enable_lora or
        # quantize swap them, and a function traced before would still read the old ones.
        # (Listed once per prefill: doing it every step would cost time on a big model.)
        self._variables_key = tuple(id(v) for v in self.model.variables)

    def prefill(self, token_ids, start, cache_length):
        token_ids = np.asarray(token_ids, np.int32)
        batch, length = token_ids.shape
        if length % PREFILL_CHUNK:
            raise ValueError(f"prefill takes a multiple of {PREFILL_CHUNK} tokens, got {length}")
        self._refresh()
        cache = self.model.backbone.init_cache(batch, cache_length)
        for i in range(0, length, PREFILL_CHUNK):
            logits, cache = self._step(token_ids[:, i:i + PREFILL_CHUNK], cache, i, start)
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
def generate_ids(model, prompts, max_new_tokens=None, sampler="greedy", stop_token_ids=None,
                 seed=None, max_length=None, truncate=False, temperature=None, top_k=None,
                 top_p=None):
    """Yield, for each decoding step, the new token of every row as `(ids [B], alive [B])`.

    `prompts` is a list of non-empty token-id lists. `alive[b]` is False for rows that have
    already stopped (their `ids[b]` is padding); a row's stop token is yielded with alive
    True, and the row is dead from the next step on. See `generate` for the arguments.
    """
    config = model.config
    sampler = get_sampler(sampler, temperature=temperature, top_k=top_k, top_p=top_p)
    limit = config.max_position_embeddings
    if max_length is not None:
        max_length = _check_positive_int("max_length", max_length)
        if max_length > limit:
            raise ValueError(f"max_length ({max_length}) exceeds the model's context "
                             f"({limit} positions)")
        limit = max_length
    max_new_tokens = _check_positive_int("max_new_tokens", defaults.max_new_tokens(
        max_new_tokens, max(len(p) for p in prompts), limit))
    prompts = _fit_to_limit(prompts, max_new_tokens, limit, truncate, config.bos_token_id)
    stop = np.array(sorted(_stop_ids(config, stop_token_ids)), np.int64)
    rng = np.random.default_rng(seed)

    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    prompt_slots = _round_up(lengths.max(), PREFILL_CHUNK)
    cache_length = cache_slots(prompt_slots + max_new_tokens)
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


def generate(model, prompts, max_new_tokens=None, sampler="greedy", stop_token_ids=None,
             seed=None, max_length=None, truncate=False, temperature=None, top_k=None,
             top_p=None):
    """Complete `prompts` with up to `max_new_tokens` tokens each.

    Args:
      prompts: a string or a list of strings (needs `model.tokenizer`; `<bos>` is added), or
        a token-id list or a list of token-id lists of any lengths.
      max_new_tokens: the most tokens to add per prompt (> 0); default 64, or what the
        longest prompt leaves of the limit.
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


def stream(model, prompt, max_new_tokens=None, sampler="greedy", stop_token_ids=None,
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
    steps = generate_ids(model, ids, max_new_tokens, sampler, stop_token_ids, seed,
                         max_length, truncate, temperature, top_k, top_p)
    tokens = itertools.takewhile(lambda t: t not in stop, (int(s[0]) for s, _ in steps))
    yield from stream_text(model.tokenizer, tokens) if is_text else tokens


# ------------------------------------------------------------ loading and chatting
def load_model(directory=None, dtype=None):
    """`Gemma2CausalLM.from_pretrained(directory)` (a gemma-keras or Hugging Face model
    directory, tokenizer attached); `None` loads the bundled tiny model."""
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.tiny_task import model_dir_or_tiny

    return Gemma2CausalLM.from_pretrained(model_dir_or_tiny(directory), dtype=dtype)


class ChatSession:
    """A multi-turn chat in Gemma's turn format with anything that has `.tokenizer` and
    `.stream(prompt, max_new_tokens=..., sampler=..., seed=..., ...)`: a `Gemma2CausalLM`
    or a `gemma_keras.tflite.GemmaTFLite`.

    Each `send(text)` renders the whole history with the chat template and streams the
    reply (stopping at `<end_of_turn>`); the reply joins the history. The oldest turns are
    dropped when the history would not fit `limit` tokens with `max_new_tokens` more.

    Example:
    >>> chat = ChatSession(lm, max_new_tokens=64)
    >>> print("".join(chat.send("reverse: cat dog")))
    """

    def __init__(self, model, max_new_tokens=None, limit=None, seed=None, **sampling):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("chat needs a model with a tokenizer")
        self.model = model
        if limit is None:
            limit = getattr(model, "cache_len", None) or model.config.max_position_embeddings
        self.limit = limit
        self.max_new_tokens = _check_positive_int(
            "max_new_tokens", defaults.chat_reply_tokens(max_new_tokens, limit))
        self.seed = seed
        self.sampling = sampling
        self.messages = []

    def reset(self):
        self.messages = []

    def _prompt(self):
        tokenizer = self.model.tokenizer
        while True:
            prompt = tokenizer.apply_chat_template(self.messages)
            n = len(tokenizer.encode(prompt))
            if n + self.max_new_tokens <= self.limit or len(self.messages) == 1:
                return prompt
            self.messages = self.messages[2:]  # drop the oldest user/model pair

    def send(self, text):
        """Yield the reply to `text` in pieces; it is added to the history when complete."""
        if not text:
            raise ValueError("empty message")
        self.messages.append({"role": "user", "content": text})
        seed = None if self.seed is None else self.seed + len(self.messages)
        try:
            pieces = []
            for piece in self.model.stream(self._prompt(), max_new_tokens=self.max_new_tokens,
                                           seed=seed, **self.sampling):
                pieces.append(piece)
                yield piece
        except BaseException:
            self.messages.pop()  # a failed or interrupted turn leaves no trace
            raise
        self.messages.append({"role": "model", "content": "".join(pieces)})
