"""The `tf.Module` that a Gemma 2 SavedModel serves: text in, text out, plus scoring.

Signatures:
  serving_default(prompts, max_new_tokens?, temperature?, top_k?, top_p?, seed?)
      -> {"completions": string [batch], "token_ids": int32 [batch, steps]}
  score(token_ids) -> {"log_probs": float32 [batch, length]}

Export options (see `gemma_keras.saved_model.export_saved_model`):
  batching: every `serving_default` input is [batch] and required (no scalar, no default),
    as TensorFlow Serving's `--enable_batching` needs.
  in_graph_batching: the generation runs inside a `BatchFunction` op (`serving.batching`).
  xla: the prefill and decode step are XLA-compiled functions (`jit_compile=True`);
    otherwise every op is core TensorFlow or tensorflow-text.

A request is checked (INVALID_ARGUMENT) on its own rows before anything is batched, and
every limit is per prompt, so a request answers the same alone or merged with others.

The in-graph loop follows the host loop of `gemma_keras.decoding` (which the Keras model and
the TFLite runtime run): the stop ids and the cache-size rule of `gemma_keras.conventions`,
left padding with the pad id, and the sampling definition of `gemma_keras.samplers` through
its TensorFlow twin, `serving.sampling` (one seed for several prompts: prompt b draws with
`seed + b`). So a prompt, its settings and its seed give the same tokens here as there.
"""

from __future__ import annotations

import tensorflow as tf

from gemma_keras.conventions import MIN_CACHE_SLOTS, PAD_ID, PREFILL_CHUNK, STOP_IDS
from gemma_keras.serving.batching import batch_function
from gemma_keras.serving.sampling import next_token
from gemma_keras.tokenizer import GemmaTokenizer

GENERATE_INPUTS = (("prompts", tf.string), ("max_new_tokens", tf.int32),
                   ("temperature", tf.float32), ("top_k", tf.int32), ("top_p", tf.float32),
                   ("seed", tf.int64))


def _check(condition, template, *values):
    """An in-graph assertion: InvalidArgumentError "assertion failed: [message]" when
    `condition` is false; the message is `template` with each `{}` filled from `values`."""
    message = tf.strings.format(template, values, summarize=8) if values else template
    return tf.debugging.Assert(condition, [message])


def _per_row(value, batch, name, dtype):
    """Broadcast a scalar or a [batch] parameter to [batch] (one value per prompt)."""
    value = tf.reshape(tf.cast(value, dtype), [-1])
    size = tf.size(value)
    with tf.control_dependencies([_check(
        tf.logical_or(tf.equal(size, 1), tf.equal(size, batch)),
        f"{name} must be a scalar or hold one value per prompt; got {{}} values for {{}} "
        "prompts", size, batch,
    )]):
        return tf.broadcast_to(value, [batch])


def _left_pad(ragged_ids, multiple=1):
    """Ragged ids [batch, None] -> (left-padded ids [batch, T], start [batch]) with pad 0;
    T is the longest row rounded up to `multiple`."""
    lengths = tf.cast(ragged_ids.row_lengths(), tf.int32)
    width = (tf.reduce_max(lengths) + multiple - 1) // multiple * multiple
    right = ragged_ids.to_tensor(default_value=PAD_ID)  # [batch, longest row]
    start = width - lengths
    source = tf.range(width)[None, :] - start[:, None]
    padded = tf.where(source >= 0, tf.gather(right, tf.maximum(source, 0), batch_dims=1),
                      PAD_ID)
    return padded, start


def _row_seeds(seed, batch):
    """`samplers.row_seeds` in the graph: one seed per prompt as given; one seed for several
    prompts: prompt b draws with `seed + b`."""
    seed = tf.reshape(tf.cast(seed, tf.int64), [-1])
    return tf.cond(tf.equal(tf.size(seed), 1),
                   lambda: seed[0] + tf.range(tf.cast(batch, tf.int64)),
                   lambda: _per_row(seed, batch, "seed", tf.int64))


def cache_slots_for(n):
    """In-graph `conventions.cache_slots_for`: the next power of two (at least
    MIN_CACHE_SLOTS) up to 4096, then the next multiple of 1024, of an int32 scalar `n`."""
    powers = tf.bitwise.left_shift(1, tf.range(31))
    power = tf.reduce_min(tf.where(powers >= n, powers, powers[-1]))
    return tf.where(n > 4096, (n + 1023) // 1024 * 1024, tf.maximum(MIN_CACHE_SLOTS, power))


class GemmaServingModule(tf.Module):
    """Holds a `Gemma2CausalLM`'s variables, the tokenizer asset and the serving functions.

    The Keras model (TensorFlow backend) is called inside the functions; only its variables
    are tracked, so the SavedModel needs no project code to load.

    Args:
      model: a `Gemma2CausalLM`.
      tokenizer_path: the SentencePiece model, named `tokenizer.model` (it is copied into
        `assets/` under its own name).
      max_length: the most tokens (prompt + completion) one prompt may ask for.
      max_new_tokens: the default of the `max_new_tokens` input (unused with `batching`).
      batching: every `serving_default` input is [batch] and has no default.
      in_graph_batching: a `serving.batching.InGraphBatching`, or None.
      xla: compile the prefill and decode step with XLA.
    """

    def __init__(self, model, tokenizer_path, max_length, max_new_tokens, batching=False,
                 in_graph_batching=None, xla=False):
        super().__init__(name="gemma2_serving")
        # Kept out of tf.Module's tracking: the Keras object graph is not saved, its
        # variables are (below), and the traced functions capture them.
        object.__setattr__(self, "_model", model)
        self.model_variables = [v.value for v in model.variables]
        # In-graph (de)tokenization is GemmaTokenizer's tf_encode/tf_decode; the tracked
        # tensorflow-text tokenizer is saved with the model. Its SentencepieceOp takes the
        # model proto as an attribute, so the graph holds a copy of it;
        # assets/tokenizer.model is the same file, for clients.
        object.__setattr__(self, "_tokenizer", GemmaTokenizer(tokenizer_path))
        self.tokenizer = self._tokenizer.tf_tokenizer
        self.tokenizer_asset = tf.saved_model.Asset(str(tokenizer_path))
        self.max_length = int(max_length)
        self.vocab_size = int(model.config.vocab_size)
        object.__setattr__(self, "_in_graph_batching", in_graph_batching)
        object.__setattr__(self, "_xla_step", tf.function(
            self._step, jit_compile=True, autograph=False) if xla else None)

        if batching:
            def generate(prompts, max_new_tokens, temperature, top_k, top_p, seed):
                return self._generate(prompts, max_new_tokens, temperature, top_k, top_p, seed)
        else:
            def generate(prompts,
                         max_new_tokens=tf.constant(int(max_new_tokens), tf.int32),
                         temperature=tf.constant(0.0, tf.float32),
                         top_k=tf.constant(0, tf.int32),
                         top_p=tf.constant(1.0, tf.float32),
                         seed=tf.constant(0, tf.int64)):
                return self._generate(prompts, max_new_tokens, temperature, top_k, top_p, seed)

        def score(token_ids):
            return self._score(token_ids)

        # [batch] each; without `batching`, the settings may also be scalars.
        generate_inputs = [tf.TensorSpec([None] if batching or name == "prompts" else None,
                                         dtype, name=name) for name, dtype in GENERATE_INPUTS]
        score_inputs = [tf.TensorSpec([None, None], tf.int32, name="token_ids")]
        self.generate = tf.function(generate, input_signature=generate_inputs,
                                    jit_compile=False, autograph=False)
        self.score = tf.function(score, input_signature=score_inputs,
                                 jit_compile=False, autograph=False)

    def signatures(self):
        """`{"serving_default": ..., "score": ...}` for `tf.saved_model.save`.

        Without `xla`, save within `core_ops.core_tf_kernels()` so the functions trace to
        core TensorFlow ops that run well on TensorFlow's own kernels. The `tf.function`s (not concrete functions) are given so that the
        SavedModel records the optional inputs' defaults in the SignatureDef.
        """
        return {"serving_default": self.generate, "score": self.score}

    # ------------------------------------------------------------------ text in/out
    def _decode(self, token_ids):
        """Text of generated ids, without special tokens (nor ids the tokenizer lacks, for a
        model whose embedding is padded beyond the tokenizer's vocabulary)."""
        known = tf.ragged.boolean_mask(token_ids, token_ids < self._tokenizer.vocab_size)
        return self._tokenizer.tf_decode(known)

    # ---------------------------------------------------------------- the request
    def _generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed):
        rows = self._request_rows(prompts, max_new_tokens, temperature, top_k, top_p, seed)
        if self._in_graph_batching is None:
            completions, token_ids = self._complete(*rows)
        else:
            completions, token_ids = batch_function(self._in_graph_batching, self._complete,
                                                    rows)
        return {"completions": completions, "token_ids": token_ids}

    def _request_rows(self, prompts, max_new_tokens, temperature, top_k, top_p, seed):
        """Check one request and return its inputs as [batch] tensors (one per prompt)."""
        empty = tf.where(tf.strings.length(prompts) == 0)[:, 0]
        checks = [
            _check(tf.size(prompts) > 0, "prompts must hold at least one string; got none"),
            _check(tf.size(empty) == 0, "prompts must not be empty strings; prompt(s) {} are",
                   empty),
        ]
        with tf.control_dependencies(checks):
            prompts = tf.identity(prompts)  # everything below runs after the checks
        batch = tf.size(prompts)
        max_new = _per_row(max_new_tokens, batch, "max_new_tokens", tf.int32)
        temperature = _per_row(temperature, batch, "temperature", tf.float32)
        top_k = _per_row(top_k, batch, "top_k", tf.int32)
        top_p = _per_row(top_p, batch, "top_p", tf.float32)
        seeds = _row_seeds(seed, batch)
        lengths = tf.cast(self._tokenizer.tf_encode(prompts).row_lengths(), tf.int32)
        too_long = tf.where(lengths + max_new > self.max_length)[:, 0]
        checks = [
            _check(tf.reduce_all(max_new >= 1), "max_new_tokens must be >= 1; got {}", max_new),
            _check(tf.size(too_long) == 0,
                   "prompt(s) {} of {} tokens with max_new_tokens {} exceed the "
                   f"{self.max_length} tokens (max_length) this model was exported for",
                   too_long, tf.gather(lengths, too_long), tf.gather(max_new, too_long)),
            _check(tf.reduce_all(temperature >= 0), "temperature must be >= 0; got {}",
                   temperature),
            _check(tf.reduce_all(top_k >= 0), "top_k must be >= 0 (0: off); got {}", top_k),
            _check(tf.reduce_all((top_p > 0) & (top_p <= 1)),
                   "top_p must be in (0, 1] (1: off); got {}", top_p),
        ]
        if self._in_graph_batching is not None:
            limit = self._in_graph_batching.max_batch_size
            checks.append(_check(batch <= limit, "a request may hold at most "
                                 f"{limit} prompts (max_batch_size); got {{}}", batch))
        with tf.control_dependencies(checks):
            return tuple(tf.identity(t) for t in (prompts, max_new, temperature, top_k, top_p,
                                                  seeds))

    # -------------------------------------------------------------------- generate
    def _step(self, token_ids, cache, cache_index, start):
        """Run `token_ids` [batch, T] into the cache; the logits [batch, vocab] of the last."""
        hidden, cache = self._model.backbone.call_with_cache(token_ids, cache, cache_index,
                                                             start)
        return self._model.logits(hidden[:, -1, :]), cache

    def _prefill(self, prompt_ids, start, steps):
        """(logits of the last prompt token, cache) for left-padded `prompt_ids`."""
        backbone = self._model.backbone
        batch, width = tf.shape(prompt_ids)[0], tf.shape(prompt_ids)[1]
        if self._xla_step is None:  # one run over the whole prompt, an exact-size cache
            return self._step(prompt_ids, backbone.init_cache(batch, width + steps), 0, start)
        # XLA compiles per shape: chunks of PREFILL_CHUNK tokens and a bucketed cache, as
        # `Gemma2CausalLM.generate` does, so two compilations serve every prompt length.
        cache = backbone.init_cache(batch, cache_slots_for(width + steps))
        chunks = tf.reshape(prompt_ids, [batch, -1, PREFILL_CHUNK])
        logits, cache = self._xla_step(chunks[:, 0], cache, tf.constant(0), start)

        def prefill_chunk(i, logits, cache):
            logits, cache = self._xla_step(chunks[:, i], cache, i * PREFILL_CHUNK, start)
            return i + 1, logits, cache

        _, logits, cache = tf.while_loop(lambda i, *_: i < tf.shape(chunks)[1], prefill_chunk,
                                         (tf.constant(1), logits, cache))
        return logits, cache

    def _complete(self, prompts, max_new, temperature, top_k, top_p, seeds):
        """(completions [batch], token_ids [batch, steps]) of checked per-prompt inputs."""
        step_fn = self._xla_step or self._step
        batch = tf.size(prompts)
        multiple = 1 if self._xla_step is None else PREFILL_CHUNK
        prompt_ids, start = _left_pad(self._tokenizer.tf_encode(prompts), multiple)  # <bos>
        prompt_len = tf.shape(prompt_ids)[1]
        steps = tf.reduce_max(max_new)
        logits, cache = self._prefill(prompt_ids, start, steps)
        stop_ids = tf.constant(STOP_IDS, tf.int32)

        def keep_going(step, logits, cache, done, tokens):
            return tf.logical_and(step < steps, tf.logical_not(tf.reduce_all(done)))

        def decode_step(step, logits, cache, done, tokens):
            token = next_token(logits, temperature, top_k, top_p, seeds, step)
            token = tf.where(done, PAD_ID, token)
            tokens = tokens.write(step, token)
            done = (done | tf.reduce_any(token[:, None] == stop_ids, axis=-1)
                    | (step + 1 >= max_new))
            more = tf.logical_and(step + 1 < steps, tf.logical_not(tf.reduce_all(done)))
            logits, cache = tf.cond(
                more, lambda: step_fn(token[:, None], cache, prompt_len + step, start),
                lambda: (logits, cache))
            return step + 1, logits, cache, done, tokens

        _, _, _, _, tokens = tf.while_loop(
            keep_going, decode_step,
            (tf.constant(0), logits, cache, tf.zeros([batch], tf.bool),
             tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])),
        )
        token_ids = tf.transpose(tokens.stack())  # [batch, steps run]; the loop runs >= 1
        return self._decode(token_ids), token_ids

    # ----------------------------------------------------------------------- score
    def _score(self, token_ids):
        """log P(token_ids[:, t] | token_ids[:, :t]) for t >= 1; 0 at t = 0 and on padding.

        Rows are right-padded with the pad id 0.
        """
        shape = tf.shape(token_ids)
        valid = token_ids != PAD_ID
        checks = [
            _check(tf.reduce_all(shape > 0), "token_ids must be a non-empty [batch, length] "
                   "matrix; got shape {}", shape),
            _check(tf.reduce_all((token_ids >= 0) & (token_ids < self.vocab_size)),
                   f"token_ids must be in [0, {self.vocab_size}); got min {{}} and max {{}}",
                   tf.reduce_min(token_ids), tf.reduce_max(token_ids)),
            _check(tf.logical_not(tf.reduce_any(valid[:, 1:] & tf.logical_not(valid[:, :-1]))),
                   "token_ids must be right-padded with the pad id 0 (no token after a pad)"),
        ]
        with tf.control_dependencies(checks):
            token_ids = tf.identity(token_ids)
        hidden = self._model.backbone({"token_ids": token_ids, "padding_mask": valid})
        log_probs = tf.nn.log_softmax(self._model.logits(hidden[:, :-1, :]), axis=-1)
        picked = tf.gather(log_probs, token_ids[:, 1:, None], batch_dims=2)[..., 0]
        picked = tf.concat([tf.zeros([shape[0], 1], picked.dtype), picked], axis=1)
        return {"log_probs": tf.where(valid, picked, 0.0)}
