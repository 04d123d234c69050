"""Export a Gemma 2 causal LM to one `.tflite` file with prefill/decode signatures and a KV cache.

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
reads (one stored copy; see `table`).

Memory: the export holds each weight once. The Keras weights are released while the
converter runs (it reads them from the SavedModel on disk) and read back, bit for bit, at the
end, also when the export fails (see `_ExportWeights`).

This module imports TensorFlow; `gemma_keras.tflite` imports it only when exporting.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gemma_keras.tflite import quantize as quantize_lib
from gemma_keras.tflite import requantize as requantize_lib
from gemma_keras import defaults
from gemma_keras.atomic_files import write_atomically
from gemma_keras.tflite.converter_weight_map import record_weight_map
from gemma_keras.tflite.native_log import stderr_captured
from gemma_keras.tflite.weight_map_metadata import stored_factors
from gemma_keras.conventions import (
    DECODE,
    LOGITS,
    MASK_VISIBLE_ABOVE,
    cache_names,
    prefill_name,
    score_name,
    stored_table_scale,
)


def _require_tensorflow_backend():
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "TFLite export traces the Keras model with TensorFlow; set KERAS_BACKEND=tensorflow "
            f"(the current backend is {keras.backend.backend()!r})"
        )


def _load_model(model):
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


def _check_lengths(config, kv_cache_max_len, prefill_lens):
    kv_cache_max_len = defaults.kv_cache_max_len(kv_cache_max_len,
                                                 config.max_position_embeddings)[0]
    if int(kv_cache_max_len) < 2:
        raise ValueError(f"kv_cache_max_len must be at least 2, got {kv_cache_max_len}")
    if kv_cache_max_len > config.max_position_embeddings:
        raise ValueError(
            f"kv_cache_max_len={kv_cache_max_len} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings})"
        )
    lens = sorted({int(t) for t in defaults.prefill_lens(prefill_lens, kv_cache_max_len)[0]})
    if not lens or lens[0] < 1:
        raise ValueError(f"prefill_lens must be positive integers, got {list(prefill_lens)}")
    if lens[-1] > kv_cache_max_len:
        raise ValueError(
            f"prefill length {lens[-1]} is longer than the cache (kv_cache_max_len="
            f"{kv_cache_max_len})"
        )
    return int(kv_cache_max_len), lens


class _GemmaSignatures:
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
            "tokens": tf.TensorSpec((1, seq_len), tf.int32, name="tokens"),
            "input_pos": tf.TensorSpec((seq_len,), tf.int32, name="input_pos"),
            "mask": tf.TensorSpec((1, 1, seq_len, self.cache_len), tf.float32, name="mask"),
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

        positions = inputs["input_pos"][None, :]  # [1, T]
        visible = inputs["mask"][:, 0] > MASK_VISIBLE_ABOVE  # [1, T, S]
        distance = positions[:, :, None] - tf.range(self.cache_len, dtype=tf.int32)[None, None]
        sliding = tf.logical_and(visible, distance < c.sliding_window)

        hidden, new_cache = backbone.run_blocks(
            self.embed(inputs["tokens"]), positions, (visible, sliding),
            cache=cache, cache_index=inputs["input_pos"][0],
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


class _ExportWeights:
    """Holds each weight once during an export, and gives the Keras model its weights back.

    A context manager around one export of `model`. `variables` are the tf.Variables under the
    Keras weights, in `model.variables` order (the SavedModel tracks them as `weights/<i>`).
    `release()`, once the SavedModel is written, frees them all in place, since the converter
    reads the weights from the SavedModel. On exit, even after an error, each released weight
    is read back from `checkpoint` (the SavedModel's `variables/variables`) one at a time, so
    the model is as it was, bit for bit. Refuses models with LoRA adapters (merge them first).
    """

    def __init__(self, model, checkpoint, restore=True):
        import tensorflow as tf

        self.tf = tf
        self.checkpoint = str(checkpoint)
        self.restore_model = restore
        refuse_lora(model)
        self.variables = [v.value for v in model.variables]
        self.released = False

    def __enter__(self):
        return self

    def _free(self, variable):
        """Shrink `variable` to an empty tensor in place, freeing its buffer (deleting Python
        references would not: the traced functions hold the handles)."""
        self.tf.raw_ops.AssignVariableOp(resource=variable.handle,
                                         value=self.tf.zeros([0], variable.dtype),
                                         validate_shape=False)

    def release(self):
        """Free every weight (call once the SavedModel is written)."""
        self.released = True
        for variable in self.variables:
            self._free(variable)
        _return_freed_memory()

    def __exit__(self, *exc):
        if not (self.released and self.restore_model):
            return
        _return_freed_memory()  # what the converter freed
        reader = self.tf.train.load_checkpoint(self.checkpoint)
        for index, variable in enumerate(self.variables):
            value = reader.get_tensor(f"weights/{index}/.ATTRIBUTES/VARIABLE_VALUE")
            self.tf.raw_ops.AssignVariableOp(resource=variable.handle, value=value,
                                             validate_shape=False)
            del value
        self.released = False


def refuse_lora(model):
    """Raise ValueError if a layer of `model` carries LoRA adapters (merge them first)."""
    for layer in model._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            raise ValueError(f"layer {layer.path!r} has LoRA adapters; merge them into the "
                             f"weights first (model.merge_lora()), then export")


def _return_freed_memory():
    """Hand freed heap memory back to the OS before the converter runs: glibc keeps freed
    blocks under its mmap threshold (up to 32 MB, e.g. the 2B's attention kernels) in its
    arenas, about 1 GiB for the 2B. A no-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _convert(saved_model_dir, signature_keys, quantize, placeholders=False):
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


def export_tflite(model, out, quantize="none", kv_cache_max_len=None,
                  prefill_lens=None, progress=True, score_lens=()):
    """Export `model` (a `Gemma2CausalLM` or a model directory) to the `.tflite` file `out`.

    Args:
      quantize: one of `gemma_keras.tflite.QUANTIZATIONS`: "none" (float32), "fp16",
        "dynamic_int8" (TensorFlow's converter's encoding, per-tensor scales),
        "weight_only_int8" (ai-edge-quantizer on the float32 file, per channel, in memory),
        "int8_channel", "int4_block32", "int4_block128", "int4_channel" (the dynamic_int8
        file's weights requantized from the float originals, `requantize.py`). All but
        weight_only_int8 stream the weights from the model or its directory (`lean_export`).
      kv_cache_max_len: cache slots S; prompt plus generated tokens must fit in S. Default:
        1024, or the model's max_position_embeddings if smaller.
      prefill_lens: one `prefill_<T>` signature per length T. Default: 8, 64 and 256, those
        that fit the cache.
      score_lens: one `score_<T>` signature per length T (logits at every position, for
        `gemma_keras.evaluation`); default none. Each must fit the cache.
    Returns the output path. The file is written under a temporary name and renamed when
    complete.

    Example:
    >>> export_tflite("my_model_dir", "gemma.tflite", quantize="int4_block32",
    ...               kv_cache_max_len=1280, prefill_lens=(8, 64, 256))  # doctest: +SKIP
    """
    return export_tflite_variants(model, {quantize: out}, kv_cache_max_len, prefill_lens,
                                  progress, score_lens)[quantize]


def export_tflite_variants(model, outputs, kv_cache_max_len=None,
                           prefill_lens=None, progress=True, score_lens=(), route="lean"):
    """Export several quantizations of one model, tracing it once.

    `outputs` maps a quantization mode to its output path, e.g.
    `{"dynamic_int8": "g8.tflite", "int4_block32": "g4.tflite"}`. Returns `{mode: Path}`.

    `route`: "lean" (the default, `lean_export.py`) converts the graph with placeholders for
    the weights and streams them in from the model or its directory, never holding them all;
    "converter" runs TensorFlow's converter on a SavedModel with all the weights (about twice
    the float32 weights in memory), the reference the lean route is tested against.
    """
    if not outputs:
        raise ValueError("outputs is empty: give at least one {quantize: path}")
    for quantize in outputs:
        quantize_lib.check_quantization(quantize)
    if route not in ("lean", "converter"):
        raise ValueError(f"route must be 'lean' or 'converter', got {route!r}")
    _require_tensorflow_backend()
    import tensorflow as tf

    restore = not isinstance(model, (str, os.PathLike))  # nobody else holds a model we load
    if route == "lean":
        from gemma_keras.tflite import lean_export

        model, source = lean_export.model_and_source(model)
    else:
        model = _load_model(model)
    kv_cache_max_len, prefill_lens = _check_lengths(model.config, kv_cache_max_len, prefill_lens)
    score_lens = sorted({int(t) for t in score_lens or ()})
    if score_lens and not 1 <= score_lens[0] <= score_lens[-1] <= kv_cache_max_len:
        raise ValueError(f"score_lens must be in [1, {kv_cache_max_len}] (kv_cache_max_len), "
                         f"got {score_lens}")
    for quantize in outputs:
        quantize_lib.check_block_sizes(model.config, quantize)
    outputs = {q: Path(p) for q, p in outputs.items()}
    work_parent = next(iter(outputs.values())).parent
    for path in outputs.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    if route == "lean":
        steps = _progress(progress, total=len(outputs) + 2)
        lean_export.export_lean(model, source, outputs, kv_cache_max_len, prefill_lens,
                                score_lens, steps)
        steps.close()
        return outputs

    # The int4 modes are requantized from the dynamic_int8 file, one weight at a time, with the
    # float32 originals read back from the SavedModel's checkpoint: no float32 conversion.
    int4 = [q for q in outputs if q in requantize_lib.BLOCK_SIZES]
    conversions = {"fp16" if q == "fp16" else "dynamic_int8" if q == "dynamic_int8" or q in int4
                   else "none" for q in outputs}
    steps = _progress(progress, total=2 + len(conversions) + len(outputs))
    with tempfile.TemporaryDirectory(prefix=".gemma_tflite_", dir=work_parent) as work:
        saved_model_dir = Path(work) / "saved_model"
        checkpoint = saved_model_dir / "variables" / "variables"
        with _ExportWeights(model, checkpoint, restore=restore) as weights:
            signatures = _GemmaSignatures(model, kv_cache_max_len, weights)
            functions = signatures.concrete_functions(prefill_lens, score_lens)
            steps.update("traced signatures")
            tf.saved_model.save(signatures.module, str(saved_model_dir), signatures=functions)
            steps.update("wrote SavedModel")
            # From here on the weights live only in the SavedModel (and its checkpoint): the
            # converter's peak is the process's peak.
            weights.release()
            converted = {}
            for mode in sorted(conversions):
                converted[mode] = _convert(saved_model_dir, list(functions), mode)
                steps.update(f"converted ({mode})")
                if mode == "dynamic_int8":  # written (and freed) now: the int4 modes read it
                    int8_path = outputs.get(mode, Path(work) / "dynamic_int8.tflite")
                    write_atomically(int8_path, converted.pop(mode))
                    record_weight_map(int8_path, requantize_lib.checkpoint_weights(
                        checkpoint, model), stored_factors(model.config))
            lookups = None
            if "weight_only_int8" in outputs:
                lookups = quantize_lib.gathers_to_embedding_lookups(converted["none"])
            for quantize, out in outputs.items():
                if quantize in int4:
                    floats = requantize_lib.checkpoint_weights(checkpoint, model)
                    requantize_lib.requantize_tflite(int8_path, floats, quantize, out)
                elif quantize == "weight_only_int8":
                    write_atomically(out, quantize_lib.quantize_flatbuffer(lookups, quantize))
                elif quantize != "dynamic_int8":
                    write_atomically(out, converted[quantize])
                steps.update(f"wrote {out.name}")
            converted = lookups = None  # freed before the Keras weights return
        # (leaving `_ExportWeights` restored the Keras weights from the checkpoint)
    steps.close()
    return outputs




class _progress:
    """A tqdm bar over the export's stages (silent when disabled)."""

    def __init__(self, enabled, total):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="export-tflite", unit="step")

    def update(self, what):
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
