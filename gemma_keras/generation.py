"""Text generation from a `Gemma2CausalLM` with a KV cache: prefill once, then one token a step.

The decode loop, the prompt checks and the sampling are the runtime-independent ones of
`gemma_keras.decoding` and `gemma_keras.samplers`; this module is the Keras side of it: the
compiled model step and `KerasDecodeBackend`, which runs it for the loop.

The batch is left-padded so that every row ends at the same cache slot; row b starts at slot
`start[b]` (the backbone masks the slots before it and counts RoPE positions from it). The
prompt is run once (prefill, `PREFILL_CHUNK` tokens at a time), then each step feeds only the
newest token and reads the past from the cache. One function does both: it runs T tokens per
row into the cache and returns the logits of the last; it is compiled once per shape (on
TensorFlow, `tf.function`, with XLA in float32 (`uses_xla`); `jax.jit` with the cache donated on
JAX; eager on PyTorch) and kept on the model, so repeated calls do
not retrace. Prompts are left-padded to a multiple of `PREFILL_CHUNK`, and the cache gets
`conventions.cache_slots_for` slots (a power of two), so a batch size and cache size need
exactly two compilations (T = PREFILL_CHUNK and T = 1) whatever the prompt lengths. Sampling
runs on the host.

Example:
>>> lm = Gemma2CausalLM.from_pretrained("my_model")
>>> lm.generate("The capital of France is", max_new_tokens=8)
>>> lm.generate([[2, 651, 6037], [2, 1841]], max_new_tokens=4)    # token ids in, ids out
>>> for piece in lm.stream("Tell me a story", sampler="top_p", seed=0):
...     print(piece, end="", flush=True)
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from gemma_keras import decoding
from gemma_keras.conventions import PREFILL_CHUNK, cache_slots_for


def _round_up(n, multiple):
    return -(-int(n) // multiple) * multiple


# ---------------------------------------------------------------- compiled steps
def uses_xla(model):
    """Whether TensorFlow compiles `model`'s generation step with XLA: yes in float32, not
    in 16-bit floats.

    In float32, XLA's products with the [out, in] kernels run as fast as TensorFlow's own
    kernels on prefill chunks and ~1.4x faster on the decode step (matrix-vector products
    bound by memory). XLA on CPU has no bfloat16 or float16 products: it widens every kernel
    to float32 and keeps all the widened copies alive at once, so a bfloat16 model peaked
    at 3x its weights (over 12.7 GB for the 2B's 5.2 GB). TensorFlow's own kernels (oneDNN's,
    native on CPUs with AVX512-BF16 or AMX) read the 16-bit kernels as they are
    (benchmarks/README.md, "bfloat16 on the CPU").
    """
    compute = keras.backend.standardize_dtype(model.dtype_policy.compute_dtype)
    return compute not in ("bfloat16", "float16")


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

            return tf.function(fn, jit_compile=uses_xla(self.model))
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
        slots = int(self.model.backbone.cache_size(cache))
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


# ------------------------------------------------------------- the loop's backend
class KerasDecodeBackend:
    """`decoding.DecodeBackend` of a `Gemma2CausalLM`: left-padded prompts prefilled in
    `PREFILL_CHUNK`s into a cache of `cache_slots_for(prompt slots + new tokens)` slots, then
    one compiled step per token. Limit: the model's context."""

    limit_note = "the model's context"
    max_batch_size = None

    def __init__(self, model):
        config = model.config
        self.generator = get_generator(model)
        self.capacity = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self.stop_ids = (config.eos_token_id, config.end_of_turn_id)
        self.bos_id, self.pad_id = config.bos_token_id, config.pad_token_id

    def prefill(self, prompts, max_new_tokens):
        lengths = np.array([len(p) for p in prompts])
        self.prompt_slots = _round_up(lengths.max(), PREFILL_CHUNK)
        self.start = self.prompt_slots - lengths
        token_ids = np.full((len(prompts), self.prompt_slots), self.pad_id, np.int32)
        for b, p in enumerate(prompts):
            token_ids[b, self.start[b]:] = p
        self.steps = 0
        logits, self.cache = self.generator.prefill(
            token_ids, self.start, cache_slots_for(self.prompt_slots + max_new_tokens))
        return logits

    def step(self, token_ids):
        logits, self.cache = self.generator.step(np.asarray(token_ids)[:, None], self.cache,
                                                 self.prompt_slots + self.steps, self.start)
        self.steps += 1
        return logits


def generate_ids(model, prompts, max_new_tokens=None, sampler="greedy", **kwargs):
    """`decoding.decode_steps` on the model: yields `(ids [B], alive [B])` per step for
    `prompts`, a list of non-empty token-id lists."""
    return decoding.decode_steps(KerasDecodeBackend(model), prompts, max_new_tokens, sampler,
                                 **kwargs)


def generate(model, prompts, max_new_tokens=None, sampler="greedy", **kwargs):
    """`model.generate`: complete `prompts`; see `gemma_keras.decoding.generate`."""
    return decoding.generate(KerasDecodeBackend(model), model.tokenizer, prompts,
                             max_new_tokens, sampler, **kwargs)


def stream(model, prompt, max_new_tokens=None, sampler="greedy", **kwargs):
    """`model.stream`: yield the completion of one prompt as it is produced; see
    `gemma_keras.decoding.stream`."""
    return decoding.stream(KerasDecodeBackend(model), model.tokenizer, prompt,
                           max_new_tokens, sampler, **kwargs)
