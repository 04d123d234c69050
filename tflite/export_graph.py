"""The export graph: the `prefill_<T>` / `decode` / `score_<T>` signatures of a Gemma 2 causal
LM with a KV cache, traced with TensorFlow, and TensorFlow's converter run on them.

The file follows the conventions of Google's LiteRT-LM and MediaPipe LLM runtimes:

  prefill_<T>  inputs  tokens int32 [1, T], input_pos int32 [T], mask float32 [1, 1, T, S],
                       kv_cache_k_<i> float32 [1, kv_heads, S, head_dim],
                       kv_cache_v_<i> float32 [1, kv_heads, head_dim, S] (transposed)
               outputs kv_cache_k_<i> / kv_cache_v_<i> (the updated caches)
  decode       the same with T = 1, plus output logits float32 [1, 1, vocab]
  score_<T>    (optional, `score_lens`) prefill_<T> plus output logits float32 [1, T, vocab]

S is the cache length. `mask` is additive: 0 where a query may see a key, a large negative
number (LiteRT-LM writes -0.7 * FLT_MAX) where it may not. Token t of a call is written at
cache slot `input_pos[0] + t` (one contiguous XLA dynamic_update_slice, which TFLite runs as
DYNAMIC_UPDATE_SLICE), and its RoPE position is `input_pos[t]`. Sliding-window layers add
their window constraint inside the graph from `input_pos` and the slot index.

The model's own Keras layers run the graph (TensorFlow backend, `backbone.run_blocks` with
explicit positions and masks). Their projections (`gemma_keras.layers.Linear`) keep kernels
[out, in] and compute `matmul(x, kernel, transpose_b=True)`, which the converter maps to
FULLY_CONNECTED as is: no TRANSPOSE for it to fold into a new constant per signature. Only
the tied embedding's two uses are written here: the token lookup and the output head,
`matmul(hidden, table, transpose_b=True)`, FULLY_CONNECTED on the very tensor the lookup
reads (one stored copy; see `GemmaSignatures.table`).

Both export routes trace these signatures (`export.py`, and `template.py` with placeholders
for the weights). This module imports TensorFlow when a function runs.
"""

from __future__ import annotations

import os

from gemma_keras.conventions import (
    DECODE,
    INPUT_POS,
    LOGITS,
    MASK,
    MASK_VISIBLE_ABOVE,
    TOKENS,
    cache_names,
    prefill_name,
    score_name,
    stored_table_scale,
)
from gemma_keras.lora import has_lora
from gemma_keras.tflite.native_log import stderr_captured


def require_tensorflow_backend():
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "TFLite export traces the Keras model with TensorFlow; set KERAS_BACKEND=tensorflow "
            f"(the current backend is {keras.backend.backend()!r})"
        )


def load_float32_model(model):
    """A `Gemma2CausalLM`, or a model directory (gemma-keras or Hugging Face) to load."""
    from gemma_keras.causal_lm import Gemma2CausalLM

    if isinstance(model, Gemma2CausalLM):
        if model.compute_dtype != "float32" or model.variable_dtype != "float32":
            raise ValueError(
                f"the export traces a float32 model (quantization happens in the file); this "
                f"model computes in {model.compute_dtype} with {model.variable_dtype} weights. "
                f"Load it with dtype='float32'"
            )
        return model
    if isinstance(model, (str, os.PathLike)):
        return Gemma2CausalLM.from_pretrained(model, dtype="float32")
    raise TypeError(f"expected a Gemma2CausalLM or a model directory, got {type(model).__name__}")


class GemmaSignatures:
    """Builds the tf.functions of one export (a tf.Module holding the Keras model)."""

    def __init__(self, model, kv_cache_max_len, weights):
        import tensorflow as tf

        self.tf = tf
        self.model = model
        self.config = model.config
        self.cache_len = kv_cache_max_len
        self.module = tf.Module()
        # Track the tf.Variables under the Keras variables: the converter freezes those into
        # constants, whereas tracked Keras variables stay resource variables (VAR_HANDLE /
        # READ_VARIABLE) that no signature initialises.
        self.module.weights = weights.variables

    def cache_specs(self):
        tf = self.tf
        c = self.config
        k_shape, v_shape = self.model.backbone.cache_shapes(1, self.cache_len)
        k_names, v_names = cache_names(c.num_hidden_layers)
        return {**{n: tf.TensorSpec(k_shape, tf.float32, name=n) for n in k_names},
                **{n: tf.TensorSpec(v_shape, tf.float32, name=n) for n in v_names}}

    def specs(self, seq_len):
        tf = self.tf
        return {
            TOKENS: tf.TensorSpec((1, seq_len), tf.int32, name=TOKENS),
            INPUT_POS: tf.TensorSpec((seq_len,), tf.int32, name=INPUT_POS),
            MASK: tf.TensorSpec((1, 1, seq_len, self.cache_len), tf.float32, name=MASK),
            **self.cache_specs(),
        }

    def step(self, inputs, with_logits, all_logits=False):
        """Run `tokens` through the model against the cache; return the named outputs
        (`logits` of the last token with `with_logits`, of every token with `all_logits`)."""
        tf = self.tf
        c = self.config
        backbone = self.model.backbone
        k_names, v_names = cache_names(c.num_hidden_layers)
        cache = [(inputs[k], inputs[v]) for k, v in zip(k_names, v_names)]

        positions = inputs[INPUT_POS][None, :]  # [1, T]
        visible = inputs[MASK][:, 0] > MASK_VISIBLE_ABOVE  # [1, T, S]
        distance = positions[:, :, None] - tf.range(self.cache_len, dtype=tf.int32)[None, None]
        sliding = tf.logical_and(visible, distance < c.sliding_window)

        hidden, new_cache = backbone.run_blocks(
            self.embed(inputs[TOKENS]), positions, (visible, sliding),
            cache=cache, cache_index=inputs[INPUT_POS][0],
        )
        outputs = {}
        for (k, v), k_name, v_name in zip(new_cache, k_names, v_names):
            outputs[k_name] = tf.identity(k, name=k_name)
            outputs[v_name] = tf.identity(v, name=v_name)
        if with_logits:
            outputs[LOGITS] = self.head(hidden[:, -1, :])[:, None, :]
        elif all_logits:
            outputs[LOGITS] = self.head(hidden[0])[None]  # [1, T, vocab]
        return outputs

    def table(self):
        """The one stored embedding table, `E * conventions.stored_table_scale(config)`."""
        tf = self.tf
        embedding = tf.convert_to_tensor(self.model.backbone.embed_tokens.embeddings)
        return embedding * tf.constant(stored_table_scale(self.config), embedding.dtype)

    @property
    def _cap(self):
        return self.config.final_logit_softcapping or 1.0

    def embed(self, tokens):
        """`backbone.embed(tokens)`, read from `table()`: [1, T] -> [1, T, hidden]."""
        tf = self.tf
        table = self.table()
        scale = self.config.hidden_size**0.5 * self._cap
        # A 1-D lookup, so that `quantize.gathers_to_embedding_lookups` can turn the GATHER
        # into EMBEDDING_LOOKUP, the op ai-edge-quantizer quantizes.
        rows = tf.gather(table, tf.reshape(tokens, [-1]))
        return tf.reshape(rows, [1, -1, table.shape[-1]]) * tf.constant(scale, table.dtype)

    def head(self, hidden):
        """Tied output head and final soft-cap: [1, hidden] -> float32 [1, vocab]."""
        tf = self.tf
        table = self.table()
        logits = tf.cast(tf.matmul(tf.cast(hidden, table.dtype), table, transpose_b=True),
                         tf.float32)
        if self.config.final_logit_softcapping is not None:
            logits = tf.tanh(logits) * self._cap
        return logits

    def concrete_functions(self, prefill_lens, score_lens=()):
        """`{signature_name: concrete function}` for every prefill length, decode and every
        score length."""
        tf = self.tf
        functions = {}
        for seq_len in prefill_lens:
            fn = tf.function(lambda inputs: self.step(inputs, with_logits=False))
            functions[prefill_name(seq_len)] = fn.get_concrete_function(self.specs(seq_len))
        for seq_len in score_lens:
            fn = tf.function(lambda inputs: self.step(inputs, False, all_logits=True))
            functions[score_name(seq_len)] = fn.get_concrete_function(self.specs(seq_len))
        fn = tf.function(lambda inputs: self.step(inputs, with_logits=True))
        functions[DECODE] = fn.get_concrete_function(self.specs(1))
        return functions


def refuse_lora(model):
    """Raise ValueError if `model` carries LoRA adapters (merge them first)."""
    if has_lora(model):
        raise ValueError("the model has LoRA adapters; merge them into the weights first "
                         "(model.merge_lora()), then export")


def convert(saved_model_dir, signature_keys, quantize, placeholders=False):
    """TensorFlow's converter on the SavedModel: builtin ops only, one copy of each weight.

    `placeholders`: the weights are splat constants (`template.py`); each stays a FILL op
    instead of a stored tensor, and float constants are not scanned for infinities (the scan
    visits every element of a splat: minutes at 2B; the graph holds no infinite constant)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=signature_keys
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    # The caches are inputs and outputs: the file needs no resource variables.
    converter.experimental_enable_resource_variables = False
    # Keep each norm scale a separate MUL: folding it into the following matmul writes a new
    # copy of that weight (for the output head: a second copy of the tied embedding).
    converter._experimental_disable_fuse_mul_and_fc = True
    converter._experimental_use_buffer_offset = True  # files over 2 GB
    if placeholders:
        converter._experimental_unfold_large_splat_constant = True
        converter.canonicalizing_inf_as_min_max_float = False
    if quantize == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        # Per-tensor scales for FULLY_CONNECTED too, so that the tied embedding gets one
        # int8 copy shared by GATHER and the output head.
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    with stderr_captured():  # the converter logs its passes; errors come as exceptions
        return converter.convert()
