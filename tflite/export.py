"""Export a Gemma 2 causal LM to one `.tflite` file with prefill/decode signatures and a KV cache.

The file follows the conventions of Google's LiteRT-LM and MediaPipe LLM runtimes:

  prefill_<T>  inputs  tokens int32 [1, T], input_pos int32 [T], mask float32 [1, 1, T, S],
                       kv_cache_k_<i> / kv_cache_v_<i> float32 [1, S, kv_heads, head_dim]
               outputs kv_cache_k_<i> / kv_cache_v_<i> (the updated caches)
  decode       the same with T = 1, plus output logits float32 [1, 1, vocab]

S is the cache length. `mask` is additive: 0 where a query may see a key, a large negative
number (LiteRT-LM writes -0.7 * FLT_MAX) where it may not. Token t of a call is written at
cache slot `input_pos[0] + t` (one contiguous XLA dynamic_update_slice, which TFLite runs as
DYNAMIC_UPDATE_SLICE), and its RoPE position is `input_pos[t]`. Sliding-window layers add
their window constraint inside the graph from `input_pos` and the slot index.

The model's own Keras layers run the graph (TensorFlow backend, `backbone.run_blocks` with
explicit positions and masks), except that every Dense reads a transposed [out, in] copy of its
kernel through `matmul(x, w, transpose_b=True)`, which the converter maps to FULLY_CONNECTED
as is (see `_ExportWeights`). The tied embedding's two uses are written here: the token lookup
and the output head, `matmul(hidden, table, transpose_b=True)`, which the converter maps to
FULLY_CONNECTED on the very tensor the lookup reads (one stored copy; see `table`).

Memory: the export holds each weight once. The Keras weights are swapped for the export's
copies one at a time, all of them are released while the converter runs (it reads the
SavedModel from disk), and the Keras model gets its weights back, bit for bit, at the end
(also when the export fails).

This module imports TensorFlow; `gemma_keras.tflite` imports it only when exporting.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gemma_keras.tflite import quantize as quantize_lib
from gemma_keras.tflite.signatures import (
    DECODE,
    LOGITS,
    MASK_VISIBLE_ABOVE,
    cache_names,
    prefill_name,
)

DEFAULT_PREFILL_LENS = (8, 64, 256)
DEFAULT_KV_CACHE_MAX_LEN = 1024


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
    if kv_cache_max_len is None:
        kv_cache_max_len = min(DEFAULT_KV_CACHE_MAX_LEN, config.max_position_embeddings)
    if int(kv_cache_max_len) < 2:
        raise ValueError(f"kv_cache_max_len must be at least 2, got {kv_cache_max_len}")
    if kv_cache_max_len > config.max_position_embeddings:
        raise ValueError(
            f"kv_cache_max_len={kv_cache_max_len} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings})"
        )
    lens = sorted({int(t) for t in prefill_lens})
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
        # Track plain tf.Variables (`_ExportWeights.variables`): the converter freezes those
        # into constants, whereas tracked Keras variables stay resource variables (VAR_HANDLE /
        # READ_VARIABLE) that no signature initialises.
        self.module.weights = weights.variables

    def cache_specs(self):
        tf = self.tf
        c = self.config
        shape = (1, self.cache_len, c.num_key_value_heads, c.head_dim)
        k_names, v_names = cache_names(c.num_hidden_layers)
        return {name: tf.TensorSpec(shape, tf.float32, name=name) for name in k_names + v_names}

    def specs(self, seq_len):
        tf = self.tf
        return {
            "tokens": tf.TensorSpec((1, seq_len), tf.int32, name="tokens"),
            "input_pos": tf.TensorSpec((seq_len,), tf.int32, name="input_pos"),
            "mask": tf.TensorSpec((1, 1, seq_len, self.cache_len), tf.float32, name="mask"),
            **self.cache_specs(),
        }

    def step(self, inputs, with_logits):
        """Run `tokens` through the model against the cache; return the named outputs."""
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
        return outputs

    def table(self):
        """The one stored embedding table, `E / final_logit_softcapping`.

        TensorFlow's converter folds a constant scale after FULLY_CONNECTED into a scaled copy
        of its weights, so `cap * tanh((h @ E.T) / cap)` would store the embedding twice. With
        the table stored already divided by the cap, the head needs no scale and the token
        lookup multiplies by `sqrt(hidden) * cap` instead of `sqrt(hidden)`: both read the
        same tensor.
        """
        tf = self.tf
        embedding = tf.convert_to_tensor(self.model.backbone.embed_tokens.embeddings)
        return embedding * tf.constant(1.0 / self._cap, embedding.dtype)

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

    def concrete_functions(self, prefill_lens):
        """`{signature_name: concrete function}` for every prefill length and decode."""
        tf = self.tf
        functions = {}
        for seq_len in prefill_lens:
            fn = tf.function(lambda inputs: self.step(inputs, with_logits=False))
            functions[prefill_name(seq_len)] = fn.get_concrete_function(self.specs(seq_len))
        fn = tf.function(lambda inputs: self.step(inputs, with_logits=True))
        functions[DECODE] = fn.get_concrete_function(self.specs(1))
        return functions


class _ExportWeights:
    """The weights the export graph reads, holding each weight once for the whole export.

    A context manager around one export of `model`:
    - on entry, each Dense kernel [in, out] is copied, one at a time, into a new tf.Variable
      holding its transpose [out, in], and the Keras kernel's buffer is released right after;
      until exit, each Dense computes `matmul(reshape(x, [-1, in]), w, transpose_b=True)` from
      it (FULLY_CONNECTED with no TRANSPOSE for the converter to fold into a new constant per
      signature). `variables` lists the export's weights, one per `model.variables`: the
      transposed kernels and, for everything else, the Keras variables' own tf.Variables;
    - `release()`, once the SavedModel is written, frees every weight (the converter reads
      them from the SavedModel's checkpoint);
    - on exit, even after an error, each Keras weight is put back bit for bit, one at a time:
      from memory if still held, else from `checkpoint` (the SavedModel's
      `variables/variables`), and each Dense gets its own `call` back.
    Layers that already store [out, in] (`gemma_keras.layers.Linear`) are left as they are.
    Refuses models with LoRA adapters (merge them first) or Keras-quantized Dense layers.
    """

    def __init__(self, model, checkpoint, restore=True):
        import keras
        import tensorflow as tf

        self.tf = tf
        self.model = model
        self.checkpoint = str(checkpoint)
        self.restore_model = restore
        layers = model._flatten_layers(include_self=False)
        for layer in layers:
            if getattr(layer, "lora_enabled", False):
                raise ValueError(f"layer {layer.path!r} has LoRA adapters; merge them into the "
                                 f"weights first (model.merge_lora()), then export")
        dense = [layer for layer in layers if isinstance(layer, keras.layers.Dense)]
        for layer in dense:
            if layer.quantization_mode is not None:
                raise ValueError(f"layer {layer.path!r} is Keras-quantized "
                                 f"({layer.quantization_mode}); export a float32 model and "
                                 f"choose the file's quantization with `quantize`")
        self.dense = {id(layer.kernel): layer for layer in dense}
        self.keras_variables = list(model.variables)
        self.variables = []  # the export's weights, index-aligned with keras_variables
        self.released = set()  # indices of keras_variables whose buffer is freed
        self.from_checkpoint = False  # True once `release` freed the export's copies too

    def _free(self, variable):
        """Shrink `variable` (a tf.Variable) to an empty tensor in place, freeing its buffer
        (deleting Python references would not: the traced functions hold the handles)."""
        self.tf.raw_ops.AssignVariableOp(resource=variable.handle,
                                         value=self.tf.zeros([0], variable.dtype),
                                         validate_shape=False)

    def _is_transposed(self, index):
        return id(self.keras_variables[index]) in self.dense

    def __enter__(self):
        tf = self.tf
        try:
            for index, variable in enumerate(self.keras_variables):
                layer = self.dense.get(id(variable))
                if layer is None:
                    self.variables.append(variable.value)
                    continue
                transposed = tf.Variable(tf.transpose(variable.value), trainable=False,
                                         name=variable.name + "_t")
                self.variables.append(transposed)
                self._free(variable.value)
                self.released.add(index)
                object.__setattr__(layer, "call", self._transposed_call(layer, transposed))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _transposed_call(self, layer, weight):
        tf = self.tf
        units, features = weight.shape

        def call(inputs, training=None):
            lead = inputs.shape[:-1]
            x = tf.matmul(tf.reshape(inputs, [-1, features]), weight, transpose_b=True)
            if layer.bias is not None:
                x = x + layer.bias
            shape = (lead.as_list() + [units] if lead.is_fully_defined()
                     else tf.concat([tf.shape(inputs)[:-1], [units]], 0))
            x = tf.reshape(x, shape)
            return layer.activation(x) if layer.activation is not None else x

        return call

    def release(self):
        """Free every weight, the export's copies and the Keras variables alike (call once the
        SavedModel is written: they are restored from its checkpoint)."""
        self.from_checkpoint = True
        for index, variable in enumerate(self.variables):
            self._free(variable)
            self.released.add(index)
        _return_freed_memory()

    def __exit__(self, *exc):
        tf = self.tf
        for layer in self.dense.values():
            if "call" in vars(layer):
                object.__delattr__(layer, "call")
        if not self.restore_model:
            return
        reader = tf.train.load_checkpoint(self.checkpoint) if self.from_checkpoint else None
        for index in sorted(self.released):
            if reader is not None:
                value = reader.get_tensor(f"weights/{index}/.ATTRIBUTES/VARIABLE_VALUE")
            else:
                value = self.variables[index].read_value()
            if self._is_transposed(index):
                value = tf.transpose(value)
                if reader is None:
                    self._free(self.variables[index])
            tf.raw_ops.AssignVariableOp(resource=self.keras_variables[index].value.handle,
                                        value=value, validate_shape=False)
            del value
        self.released.clear()


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


def _convert(saved_model_dir, signature_keys, quantize):
    """TensorFlow's converter on the SavedModel: builtin ops only, one copy of each weight."""
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
    if quantize == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        # Per-tensor scales for FULLY_CONNECTED too, so that the tied embedding gets one
        # int8 copy shared by GATHER and the output head.
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    return converter.convert()


def export_tflite(model, out, quantize="none", kv_cache_max_len=None,
                  prefill_lens=DEFAULT_PREFILL_LENS, progress=True):
    """Export `model` (a `Gemma2CausalLM` or a model directory) to the `.tflite` file `out`.

    Args:
      quantize: one of `gemma_keras.tflite.QUANTIZATIONS`: "none" (float32), "fp16",
        "dynamic_int8" (TensorFlow's converter), "weight_only_int8", "int4_block32",
        "int4_block128" (ai-edge-quantizer on the float32 file).
      kv_cache_max_len: cache slots S; prompt plus generated tokens must fit in S. Default:
        1024, or the model's max_position_embeddings if smaller.
      prefill_lens: one `prefill_<T>` signature per length T.
    Returns the output path. The file is written under a temporary name and renamed when
    complete.

    Example:
    >>> export_tflite("my_model_dir", "gemma.tflite", quantize="int4_block32",
    ...               kv_cache_max_len=1280, prefill_lens=(8, 64, 256))  # doctest: +SKIP
    """
    return export_tflite_variants(model, {quantize: out}, kv_cache_max_len, prefill_lens,
                                  progress)[quantize]


def export_tflite_variants(model, outputs, kv_cache_max_len=None,
                           prefill_lens=DEFAULT_PREFILL_LENS, progress=True):
    """Export several quantizations of one model, tracing it once.

    `outputs` maps a quantization mode to its output path, e.g.
    `{"dynamic_int8": "g8.tflite", "int4_block32": "g4.tflite"}`. Returns `{mode: Path}`.
    The ai-edge-quantizer modes share one float32 conversion.
    """
    if not outputs:
        raise ValueError("outputs is empty: give at least one {quantize: path}")
    for quantize in outputs:
        quantize_lib.check_quantization(quantize)
    _require_tensorflow_backend()
    import tensorflow as tf

    restore = not isinstance(model, (str, os.PathLike))  # nobody else holds a model we load
    model = _load_model(model)
    kv_cache_max_len, prefill_lens = _check_lengths(model.config, kv_cache_max_len, prefill_lens)
    for quantize in outputs:
        quantize_lib.check_block_sizes(model.config, quantize)
    outputs = {q: Path(p) for q, p in outputs.items()}
    work_parent = next(iter(outputs.values())).parent
    for path in outputs.values():
        path.parent.mkdir(parents=True, exist_ok=True)

    conversions = {"fp16" if q == "fp16" else "dynamic_int8" if q == "dynamic_int8" else "none"
                   for q in outputs}
    steps = _progress(progress, total=2 + len(conversions) + len(outputs))
    with tempfile.TemporaryDirectory(prefix=".gemma_tflite_", dir=work_parent) as work:
        saved_model_dir = Path(work) / "saved_model"
        checkpoint = saved_model_dir / "variables" / "variables"
        with _ExportWeights(model, checkpoint, restore=restore) as weights:
            signatures = _GemmaSignatures(model, kv_cache_max_len, weights)
            functions = signatures.concrete_functions(prefill_lens)
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
            if any(q in quantize_lib.AI_EDGE_RECIPES for q in outputs):
                lookups = quantize_lib.gathers_to_embedding_lookups(converted["none"])
            for quantize, out in outputs.items():
                if quantize in quantize_lib.AI_EDGE_RECIPES:
                    flatbuffer = quantize_lib.quantize_flatbuffer(lookups, quantize)
                else:
                    flatbuffer = converted[quantize]
                _write_atomically(out, flatbuffer)
                steps.update(f"wrote {out.name}")
        # (leaving `_ExportWeights` restored the Keras weights from the checkpoint)
    steps.close()
    return outputs


def _write_atomically(path, data):
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
