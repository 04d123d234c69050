"""Defaults that depend on the model, derived in one place for every command and runtime.

A default is a convenience, never a reason to fail: where a fixed default (64 new tokens, a
1024-slot cache, prefill signatures of 8, 64 and 256 tokens) does not fit a model or a cache,
it is clamped to what fits, and the export helpers say so in a note. A value the user gave is
returned unchanged; the code that uses it checks it and names what is wrong.

Pure Python: the TFLite runtime imports it without TensorFlow or Keras.
"""

from __future__ import annotations

import os

DEFAULT_MAX_NEW_TOKENS = 64            # generate, the SavedModel's request default
DEFAULT_CHAT_MAX_NEW_TOKENS = 256      # one chat reply
DEFAULT_KV_CACHE_MAX_LEN = 1024        # TFLite export
DEFAULT_PREFILL_LENS = (8, 64, 256)    # TFLite export


def max_new_tokens(requested, prompt_tokens, capacity, default=DEFAULT_MAX_NEW_TOKENS) -> int:
    """`requested`, or when it is None `default` clamped to the room a prompt of
    `prompt_tokens` leaves in `capacity` positions (at least 1, so that a prompt that fills
    the cache still gets the runtime's own error naming its length)."""
    if requested is not None:
        return requested
    return max(1, min(default, capacity - prompt_tokens))


def chat_reply_tokens(requested, limit) -> int:
    """The token budget of one chat reply: `requested`, or 256 clamped to half the context
    `limit` (older turns are dropped to make room for it)."""
    if requested is not None:
        return requested
    return max(1, min(DEFAULT_CHAT_MAX_NEW_TOKENS, limit // 2))


def kv_cache_max_len(requested, max_position_embeddings) -> tuple[int, str | None]:
    """A TFLite export's cache slots and a note when the default was clamped."""
    if requested is not None:
        return int(requested), None
    if max_position_embeddings < DEFAULT_KV_CACHE_MAX_LEN:
        return max_position_embeddings, (
            f"kv_cache_max_len defaults to the model's context, {max_position_embeddings} "
            f"(smaller than {DEFAULT_KV_CACHE_MAX_LEN})")
    return DEFAULT_KV_CACHE_MAX_LEN, None


def prefill_lens(requested, cache_len) -> tuple[tuple[int, ...], str | None]:
    """A TFLite export's prefill signature lengths and a note when the default was clamped:
    the default lengths that fit the cache, or the cache length when none does."""
    if requested is not None:
        return tuple(requested), None
    fitting = tuple(t for t in DEFAULT_PREFILL_LENS if t <= cache_len) or (cache_len,)
    if fitting == DEFAULT_PREFILL_LENS:
        return fitting, None
    return fitting, (f"prefill lengths default to {','.join(map(str, fitting))}: the cache "
                     f"has {cache_len} slots")


def serving_max_new_tokens(requested, max_length) -> tuple[int, str | None]:
    """The SavedModel's default `max_new_tokens` (of a request that gives none) and a note
    when it was clamped to leave one position for the prompt in `max_length`."""
    if requested is not None:
        return int(requested), None
    if DEFAULT_MAX_NEW_TOKENS < max_length:
        return DEFAULT_MAX_NEW_TOKENS, None
    value = max(1, max_length - 1)
    return value, (f"max_new_tokens defaults to {value}: requests may hold {max_length} "
                   f"tokens in all")


# ------------------------------------------------------------------- evaluation
DEFAULT_EVAL_CONTEXT = 1024            # tokens per scoring window (gemma-keras eval)
EVAL_LOGITS_PER_RUN = 1 << 27          # float32 logits one scoring run may hold (512 MiB)
MAX_EVAL_BATCH = 32


def eval_context(requested, max_length) -> int:
    """Tokens per scoring window: `requested`, or 1024 clamped to the longest sequence the
    runtime scores (`max_length`: the model's context, the TFLite cache; None: unknown)."""
    if requested is not None:
        return int(requested)
    return DEFAULT_EVAL_CONTEXT if max_length is None else min(DEFAULT_EVAL_CONTEXT,
                                                                int(max_length))


def eval_batch_size(requested, context, vocab_size) -> int:
    """Sequences per scoring run: `requested`, or as many windows of `context` tokens as
    keep the logits [batch, context, vocab] within 512 MiB (1 to 32)."""
    if requested is not None:
        return int(requested)
    return max(1, min(MAX_EVAL_BATCH, EVAL_LOGITS_PER_RUN // (int(context) * int(vocab_size))))


DEFAULT_SCORE_LEN = 64                 # TFLite score_<T> signature for export-tflite --check


def score_lens(requested, cache_len) -> tuple[int, ...]:
    """A TFLite export's `score_<T>` lengths: `requested`, or 64 clamped to the cache."""
    if requested:
        return tuple(requested)
    return (min(DEFAULT_SCORE_LEN, int(cache_len)),)


ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn(environ=os.environ):
    """Turn TensorFlow's oneDNN ops on unless `TF_ENABLE_ONEDNN_OPTS` is already set.

    TensorFlow enables them by itself only on CPUs with AVX-512 VNNI/BF16 or AMX; elsewhere
    (AVX2) its float32 matmul is Eigen's, which scored a 2B-width model 1.8x slower
    (benchmarks/README.md, "Scoring throughput"). Takes effect only before TensorFlow is
    imported: the `gemma-keras` command calls it first."""
    environ.setdefault(ONEDNN_ENV, "1")
